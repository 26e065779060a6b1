"""Captions to integers: spaCy tokenization (cached once per dataset) and the `vocab_size` vocabulary.

Tokenized captions are cached as flat arrays that are memory-mapped when read:
    words.json     every distinct token, most frequent in the training split first (ties alphabetical)
    <split>.tokens.npy      int32, word ids of all captions of the split, concatenated
    <split>.offsets.npy     int64 [n_captions + 1], caption c is tokens[offsets[c]:offsets[c + 1]]
    <split>.img_caps.npy    int64 [n_images + 1], the captions of image i are img_caps[i]:img_caps[i + 1]
    <split>.image_ids.npy   int64 [n_images]
Because words are ordered by training frequency, any `vocab_size` is a prefix of `words`: changing it needs
no re-tokenization, only a new id lookup table.
"""
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.utils import cache_key, file_fingerprint

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
PAD, START, END, UNK = range(4)
TOKENIZER_VERSION = 1


def make_tokenizer():
    import spacy

    return spacy.blank("en").tokenizer  # rule-based English tokenizer: no model download


def tokenize(texts, lowercase=True, drop_punct=True, desc="tokenize"):
    """List of captions -> list of token lists, through spaCy's batched `pipe`."""
    tok = make_tokenizer()
    out = []
    for doc in tqdm(tok.pipe(texts, batch_size=4096), total=len(texts), desc=desc, unit="caption",
                    leave=False, mininterval=1.0):
        words = [t.lower_ if lowercase else t.text for t in doc if not (t.is_space or (drop_punct and t.is_punct))]
        out.append(words)
    return out


class Vocabulary:
    """itos: the special tokens, then the kept words. `lut` maps cached word ids to vocabulary ids."""

    def __init__(self, itos, lut=None):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.lut = lut

    @classmethod
    def from_words(cls, words, n_train_words: int, size: int):
        kept = min(size, n_train_words)  # only words seen in training can be kept
        lut = np.full(len(words), UNK, dtype=np.int64)
        lut[:kept] = np.arange(len(SPECIALS), len(SPECIALS) + kept)
        return cls(SPECIALS + list(words[:kept]), lut)

    def __len__(self):
        return len(self.itos)

    def encode(self, word_ids: np.ndarray) -> np.ndarray:
        return self.lut[word_ids]

    def decode(self, ids) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i not in (PAD, START):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path):
        Path(path).write_text("".join(w + "\n" for w in self.itos), encoding="utf-8")


def token_dir(cache_dir, splits: dict, spec: dict) -> Path:
    key = cache_key({"spec": spec, "version": TOKENIZER_VERSION,
                     "splits": {k: file_fingerprint(s.annotation_file) for k, s in splits.items()}})
    return Path(cache_dir) / "tokens" / key


def build_tokens(splits: dict, cache_dir, lowercase=True, drop_punct=True, train="train") -> Path:
    """Tokenize every caption of every split once (cached); `splits` maps role ('train', 'val') to CaptionSplit."""
    spec = {"tokenizer": "spacy-blank-en", "lowercase": lowercase, "drop_punct": drop_punct, "train": train}
    out = token_dir(cache_dir, splits, spec)
    if (out / "words.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenized = {}
    for role, split in splits.items():
        texts = [c for caps in split.captions for c in caps]
        tokenized[role] = tokenize(texts, lowercase, drop_punct, desc=f"tokenize {split.name}")
    counts = Counter(w for caption in tokenized[train] for w in caption)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    others = sorted({w for role, caps in tokenized.items() if role != train for c in caps for w in c} - counts.keys())
    all_words = words + others
    index = {w: i for i, w in enumerate(all_words)}
    for role, split in splits.items():
        caps = tokenized[role]
        lengths = np.fromiter((len(c) for c in caps), dtype=np.int64, count=len(caps))
        np.save(tmp / f"{role}.tokens.npy", np.fromiter((index[w] for c in caps for w in c), dtype=np.int32,
                                                         count=int(lengths.sum())))
        np.save(tmp / f"{role}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        per_image = np.fromiter((len(c) for c in split.captions), dtype=np.int64, count=len(split.captions))
        np.save(tmp / f"{role}.img_caps.npy", np.concatenate([[0], np.cumsum(per_image)]))
        np.save(tmp / f"{role}.image_ids.npy", np.asarray(split.image_ids, dtype=np.int64))
    meta = dict(spec, n_train_words=len(words), counts=[counts[w] for w in words])
    (tmp / "words.json").write_text(json.dumps({"words": all_words, **meta}), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("Tokenized %s captions into %s", {r: len(t) for r, t in tokenized.items()}, out)
    return out


def load_words(folder: Path) -> dict:
    return json.loads((Path(folder) / "words.json").read_text(encoding="utf-8"))


def coverage(words_meta: dict, vocab_size: int) -> float:
    """Share of training-caption tokens that the vocabulary keeps (the rest become <unk>)."""
    counts = np.asarray(words_meta["counts"], dtype=np.float64)
    return float(counts[:vocab_size].sum() / max(counts.sum(), 1.0))
