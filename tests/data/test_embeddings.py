"""Word vectors: spaCy pipelines (a tiny one saved to disk, loaded by path), GloVe, text files, learned.

Everything goes through the real loading code (`load_vectors`) and, where it matters, a real short training;
nothing is mocked. The smoke shapes captions ("a picture of two red circles") have a vocabulary of 16 words;
the tiny pipeline has vectors for some of them (red, green, blue, circle, circles, picture) and not the others.
"""
import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from captioner.data import embeddings
from captioner.data.embeddings import embedding_matrix, load_vectors, nearest_kept
from captioner.serving.inference import Captioner
from captioner.training.module import CaptionModule
from captioner.training.prepare import prepare
from captioner.run import build, train
from captioner.utils import CaptionerError
from captioner.data.vocab import SPECIALS, UNK, load_words
from conftest import run_module

VECTORS = {  # dim 5; "puppy" is nearest to "dog", "circles" to "circle", "green" to "blue"
    "dog": [1.0, 0.0, 0.0, 0.0, 0.1], "puppy": [0.9, 0.2, 0.0, 0.0, 0.1], "economy": [0.0, 0.0, 0.0, 1.0, -0.3],
    "red": [0.0, 1.0, 0.0, 0.2, 0.0], "blue": [0.1, 0.0, 1.0, 0.0, 0.0], "green": [0.2, 0.1, 0.9, 0.0, 0.0],
    "circle": [0.5, -0.5, 0.0, 0.5, 1.0], "circles": [0.5, -0.4, 0.0, 0.5, 0.9], "picture": [-1.0, 0.3, 0.3, 0.0, 0.0],
}
NO_EVAL = "++eval_every=0"  # these trainings check vectors and vocabularies, not caption metrics (slow to score)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A spaCy pipeline with a handful of vectors, saved like any pipeline (nlp.to_disk): loadable by path."""
    import spacy

    nlp = spacy.blank("en")
    for word, vec in VECTORS.items():
        nlp.vocab.set_vector(word, np.asarray(vec, dtype=np.float32))
    path = tmp_path_factory.mktemp("tiny_pipeline")
    nlp.to_disk(path)
    return path


def source(word):
    return torch.tensor(VECTORS[word])


def test_pipeline_by_path_gives_the_source_vectors_and_learned_rows_for_the_rest(pipeline, tmp_path):
    nlp = load_vectors({"name": "spacy", "pipeline": str(pipeline)}, tmp_path)
    itos = SPECIALS + ["red", "square", "circle"]
    matrix, has = embedding_matrix(nlp, itos)
    assert matrix.shape == (7, 5) and has.tolist() == [False] * 4 + [True, False, True]
    assert torch.equal(matrix[4], source("red")) and torch.equal(matrix[6], source("circle"))
    assert not matrix[:4].any() and not matrix[5].any()


@pytest.mark.slow
def test_training_with_a_pipeline_keeps_vocabulary_and_vectors_in_the_checkpoint(cfg_factory, pipeline, caplog):
    caplog.set_level(logging.INFO)
    cfg = cfg_factory("embeddings=en_core_web_lg", f"embeddings.pipeline={pipeline}", "iterations=2",
                      "trainer.val_check_interval=2", NO_EVAL)
    train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    module = CaptionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    itos = module.hparams.itos
    # the vocabulary: special tokens, then training words by frequency; readable in the run dir, and in the ckpt
    assert itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    meta = load_words(_token_folder(cfg))
    assert itos[4:] == meta["words"][:meta["n_train_words"]]
    assert sorted(meta["counts"], reverse=True) == meta["counts"]
    assert (run_dir / "vocab.txt").read_text(encoding="utf-8").splitlines() == itos
    # embedding size follows the vectors; pretrained rows are the source vectors, the others are learned
    table = module.model.embed.table()
    assert table.shape == (len(itos), 5) and module.hparams.embeddings["dim"] == 5
    for word in ("red", "blue", "circle", "picture"):
        assert torch.equal(table[itos.index(word)], source(word)), word
    has = module.model.embed.has_vector
    assert has.tolist() == [w in VECTORS and w not in SPECIALS for w in itos]
    # both coverages are logged: of training tokens by the vocabulary, of vocabulary words by the vectors
    coverage = module.hparams.embeddings["coverage"]
    assert coverage == pytest.approx(sum(w in VECTORS for w in itos[4:]) / len(itos[4:]))
    assert f"{100 * coverage:.1f}% of vocabulary words have a pretrained vector" in caplog.text
    assert "of training tokens" in caplog.text
    # captioning later rebuilds the same table from the checkpoint alone
    captioner = Captioner(ckpt, device="cpu")
    assert torch.equal(captioner.model.embed.table(), table)
    assert captioner.vocab.itos == itos


def _token_folder(cfg):
    return prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir).tokens


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_rows_stay_fixed_and_unfrozen_rows_learn(cfg_factory, pipeline, freeze):
    cfg = cfg_factory("embeddings=en_core_web_lg", f"embeddings.pipeline={pipeline}", f"embeddings.freeze={freeze}",
                      "learning_rate=0.01")
    _, vocab, dm, module = build(cfg, load_vectors(cfg.embeddings, cfg.paths.cache_dir))
    has = module.model.embed.has_vector
    before = module.model.embed.table().detach().clone()
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    after = module.model.embed.table().detach()
    assert has.sum() >= 3 and (~has).sum() >= 5
    start = vocab.itos.index("<start>")
    assert not torch.equal(after[start], before[start]), "special tokens always learn"
    assert not torch.equal(after[~has], before[~has]), "words without a vector always learn"
    if freeze:
        assert torch.equal(after[has], before[has])
    else:
        picture = vocab.itos.index("picture")  # in every caption
        assert not torch.equal(after[picture], before[picture]), "fine-tuning moves pretrained rows"


def test_learned_embeddings_use_the_configured_size(cfg_factory):
    cfg = cfg_factory("embeddings=learned", "embeddings.dim=24")
    _, vocab, _, module = build(cfg, load_vectors(cfg.embeddings, cfg.paths.cache_dir))
    assert module.model.embed.table().shape == (len(vocab), 24) and not module.model.embed.has_vector.any()


def test_a_vocab_size_change_gives_another_vocabulary_from_the_same_tokens(cfg_factory):
    common = ("embeddings=learned", "embeddings.dim=8", "iterations=1", "trainer.val_check_interval=1", NO_EVAL)
    full, small = cfg_factory(*common, run="full"), cfg_factory(*common, "vocab_size=5", run="small")
    train(full)
    train(small)
    assert _token_folder(full) == _token_folder(small), "the tokens are cached once for every vocab_size"
    vocabs = [(Path(c.paths.run_dir) / "vocab.txt").read_text().splitlines() for c in (full, small)]
    itos = [torch.load(Path(c.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["hyper_parameters"]["itos"] for c in (full, small)]
    assert vocabs == itos
    assert len(itos[1]) == 4 + 5 < len(itos[0]) and itos[0][:9] == itos[1]


def test_nearest_kept_maps_an_unknown_word_to_the_closest_kept_word(pipeline, tmp_path):
    nlp = load_vectors({"name": "spacy", "pipeline": str(pipeline)}, tmp_path)
    itos = SPECIALS + ["dog", "economy", "square"]
    words = ["dog", "economy", "square", "puppy", "zebra", "circles"]  # the vocabulary's words come first
    remap = nearest_kept(nlp, itos, words, 3)
    assert remap[3] == itos.index("dog")  # puppy -> dog
    assert 4 not in remap  # zebra has no vector: stays <unk>
    assert remap[5] == itos.index("dog")  # circles: cos 0.49 to dog, 0.18 to economy


def test_nearest_option_re_encodes_the_captions(cfg_factory, pipeline):
    cfg = cfg_factory("embeddings=en_core_web_lg", f"embeddings.pipeline={pipeline}", "embeddings.nearest=true",
                      "vocab_size=5")
    plain = cfg.copy()
    plain.embeddings.nearest = False
    unk_before = int((build(plain, load_vectors(plain.embeddings, plain.paths.cache_dir))[2].datasets["train"].ids
                      == UNK).sum())
    prepared, vocab, dm, _ = build(cfg, load_vectors(cfg.embeddings, cfg.paths.cache_dir))
    words = prepared.words["words"]
    itos = vocab.itos
    kept = [i for i, w in enumerate(itos) if w in VECTORS]
    assert kept, "'picture' is in every caption, so it is kept"

    def unit(w):
        return np.asarray(VECTORS[w]) / np.linalg.norm(VECTORS[w])
    for j, word in enumerate(words[5:], 5):
        expected = kept[int(np.argmax([unit(itos[i]) @ unit(word) for i in kept]))] if word in VECTORS else UNK
        assert vocab.lut[j] == expected, word
    assert int((dm.datasets["train"].ids == UNK).sum()) < unk_before


def test_glove50_is_converted_once_and_reused(tmp_path, monkeypatch):
    original_glove50 = embeddings._glove50
    nlp = load_vectors({"name": "glove50"}, tmp_path)
    (folder,) = [d for d in (tmp_path / "vectors").iterdir() if d.is_dir()]  # beside it: its lock file
    stamp = folder.stat().st_mtime_ns

    def rebuild():
        raise AssertionError("the cached table was rebuilt")
    monkeypatch.setattr(embeddings, "_glove50", rebuild)
    again = load_vectors({"name": "glove50"}, tmp_path)
    assert folder.stat().st_mtime_ns == stamp and [d for d in (tmp_path / "vectors").iterdir() if d.is_dir()] == [folder]
    assert again.vocab.vectors.shape == nlp.vocab.vectors.shape == (400000, 50)
    assert again is nlp  # loaded once per process for this build of the table
    (folder / "vocab" / "vectors").write_bytes(b"\0" * (folder / "vocab" / "vectors").stat().st_size)  # damaged
    monkeypatch.setattr(embeddings, "_glove50", original_glove50)
    rebuilt = load_vectors({"name": "glove50"}, tmp_path)  # verified, rebuilt: the new build is loaded
    assert rebuilt is not nlp and rebuilt.vocab.vectors.shape == (400000, 50)
    assert (rebuilt.vocab.get_vector("dog") == nlp.vocab.get_vector("dog")).all()

    matrix, has = embedding_matrix(again, SPECIALS + ["dog", "puppy", "economy"])
    assert has[4:].all() and matrix[4].shape == (50,)
    cos = torch.nn.functional.cosine_similarity
    assert cos(matrix[4], matrix[5], dim=0) > cos(matrix[4], matrix[6], dim=0)  # dog~puppy beats dog~economy


@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec"])
def test_text_file_vectors(cfg_factory, tmp_path, header):
    lines = [f"{w} " + " ".join(str(x) for x in VECTORS[w]) for w in ("red", "blue", "circle")]
    lines.insert(1, ". . . 0.1 0.2 0.3 0.4 0.5")  # a word holding spaces, as GloVe 840B has
    path = tmp_path / "vectors.txt"
    path.write_text("".join(line + "\n" for line in (["4 5"] if header else []) + lines) + "\n", encoding="utf-8")
    cfg = cfg_factory("embeddings=text", f"embeddings.path={path}")
    nlp = load_vectors(cfg.embeddings, cfg.paths.cache_dir)
    matrix, has = embedding_matrix(nlp, SPECIALS + ["red", "blue", "circle", "square"])
    assert has.tolist() == [False] * 4 + [True, True, True, False]
    assert torch.allclose(matrix[4:7], torch.stack([source("red"), source("blue"), source("circle")]))
    # converted once: the cached table is found again under the same key
    assert load_vectors(cfg.embeddings, cfg.paths.cache_dir).vocab.vectors.shape[1] == 5


@pytest.mark.parametrize("content, line", [
    ("red 0.1 0.2\nblue 0.3 zero\n", 2),
    ("red 0.1 0.2\nblue 0.3 0.4\ncircle 0.5\n", 3),
    ("3 2\nred\n", 2)])
def test_a_malformed_text_file_names_the_file_and_line(cfg_factory, tmp_path, content, line):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    cfg = cfg_factory("embeddings=text", f"embeddings.path={path}")
    with pytest.raises(CaptionerError) as err:
        load_vectors(cfg.embeddings, cfg.paths.cache_dir)
    assert str(err.value).startswith(f"{path}, line {line}:") and "\n" not in str(err.value)


def test_text_without_a_path_says_which_key_to_set(cfg_factory):
    cfg = cfg_factory("embeddings=text")
    with pytest.raises(CaptionerError, match=r"embeddings\.path="):
        load_vectors(cfg.embeddings, cfg.paths.cache_dir)


def test_a_missing_spacy_pipeline_says_how_to_install_it(cfg_factory):
    cfg = cfg_factory("embeddings=en_core_web_lg", "embeddings.pipeline=en_core_web_nonexistent")
    with pytest.raises(CaptionerError) as err:
        load_vectors(cfg.embeddings, cfg.paths.cache_dir)
    message = str(err.value)
    assert "python -m spacy download en_core_web_nonexistent" in message and "embeddings=glove50" in message
    assert "\n" not in message


@pytest.mark.slow
def test_the_cli_reports_a_missing_pipeline_in_one_line(data_dir, tmp_path):
    pytest.importorskip("spacy")
    import spacy.util

    if spacy.util.is_package("en_core_web_lg"):
        pytest.skip("en_core_web_lg is installed here")
    res = run_module("captioner.run", "embeddings=en_core_web_lg", "experiment=smoke", f"paths.data_dir={data_dir}",
                     f"hydra.run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "python -m spacy download en_core_web_lg" in errors[0]
