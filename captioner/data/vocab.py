"""Captions to integers: spaCy tokenization (cached once per dataset) and the `vocab_size` / `vocab_min_count`
vocabulary.

Tokenized captions are cached as flat arrays that are memory-mapped when read:
    words.json     every distinct token, most frequent in the training split first (ties alphabetical)
    <split>.tokens.npy      int32, word ids of all captions of the split, concatenated
    <split>.offsets.npy     int64 [n_captions + 1], caption c is tokens[offsets[c]:offsets[c + 1]]
    <split>.img_caps.npy    int64 [n_images + 1], the captions of image i are img_caps[i]:img_caps[i + 1]
    <split>.image_ids.npy   int64 [n_images]
Because words are ordered by training frequency, any `vocab_size` or `vocab_min_count` is a prefix of `words`:
changing either needs no re-tokenization, only a new id lookup table.
"""
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.caches import cache_key, cached_dir, file_fingerprint

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]
PAD, START, END, UNK = range(4)
TOKENIZER_VERSION = 3  # 2: captions without a letter or digit ("...") are dropped as empty; 3: null ones too
MAX_WORDS = 100  # data.max_words where a config lacks it: above any real COCO (~50) or Flickr (~80) caption


def make_tokenizer():
    import spacy

    return spacy.blank("en").tokenizer  # rule-based English tokenizer: no model download


def tokenize(texts, lowercase=True, drop_punct=True, desc="tokenize", chunk=128, max_words=None):
    """Captions -> (distinct words, word index per token flat int64, token count per caption int64, number of
    captions cut), each caption cut to its first `max_words` words (punctuation dropped first).

    Speed: a spaCy Doc costs far more to set up than to fill, so captions are tokenized `chunk` at a time,
    joined by a space (spaCy splits on spaces first, so a caption's tokens are exactly those it gets alone), and
    each token is assigned to its caption by its character offset. Not more at a time: after a special case
    ("don't") spaCy caches no more words for the rest of that Doc. All the rest is whole-array numpy work:
    punctuation and whitespace are properties of a word, so they are tested once per distinct word.
    """
    from spacy.attrs import IDX, LOWER, ORTH

    tok = make_tokenizer()
    attrs = [LOWER if lowercase else ORTH, IDX]
    hashes, caption = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for start in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False, mininterval=1.0):
        part = texts[start:start + chunk]
        arr = tok(" ".join(part)).to_array(attrs)
        begins = np.cumsum([0] + [len(t) + 1 for t in part[:-1]])  # where each caption starts in the joined text
        hashes.append(arr[:, 0])
        caption.append(start + np.searchsorted(begins, arr[:, 1].astype(np.int64), side="right") - 1)
    distinct, index = np.unique(np.concatenate(hashes), return_inverse=True)
    lexemes = [tok.vocab[h] for h in distinct.tolist()]
    drop = np.array([lex.is_space or (drop_punct and lex.is_punct) for lex in lexemes], dtype=bool)
    kept, caption, cut = ~drop[index], np.concatenate(caption), 0
    if max_words is not None:  # tokens are in caption order: a token's place in its caption is its rank there
        lengths = np.bincount(caption[kept], minlength=len(texts))
        first, cut = np.cumsum(lengths) - lengths, int((lengths > max_words).sum())
        kept[kept] = np.arange(int(lengths.sum())) - first[caption[kept]] < max_words
    lengths = np.bincount(caption[kept], minlength=len(texts)).astype(np.int64)
    used = np.zeros(len(distinct), dtype=bool)
    used[index[kept]] = True  # not words seen only in a cut-off tail
    remap = np.cumsum(used) - 1  # distinct-word index -> index among the kept words
    words = [lexemes[i].text for i in np.flatnonzero(used)]
    return words, remap[index[kept]], lengths, cut


class Vocabulary:
    """itos: the special tokens, then the kept words. `lut` maps cached word ids to vocabulary ids."""

    def __init__(self, itos, lut=None):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.lut = lut

    @classmethod
    def from_words(cls, words, n_train_words: int, size: int, counts=None, min_count=None):
        kept = min(size, n_train_words)  # only words seen in training can be kept
        if min_count is not None and counts is not None:  # counts fall along `words`: the rare ones are a suffix
            kept = min(kept, int((np.asarray(counts) >= min_count).sum()))
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
    """Keyed by the caption files' bytes (not their path): a copied data folder keeps its token cache."""
    files = {k: [s.name, file_fingerprint(s.annotation_file, cache_dir)] for k, s in splits.items()}
    key = cache_key({"spec": spec, "version": TOKENIZER_VERSION, "splits": files})
    return Path(cache_dir) / "tokens" / key


def token_spec(lowercase=True, drop_punct=True, train="train", max_words=MAX_WORDS) -> dict:
    """What the token cache is built with, and keyed by: a changed data.max_words rebuilds it."""
    return {"tokenizer": "spacy-blank-en", "lowercase": lowercase, "drop_punct": drop_punct, "train": train,
            "max_words": max_words}


def build_tokens(splits: dict, cache_dir, lowercase=True, drop_punct=True, train="train", max_words=MAX_WORDS,
                 before_publish=None) -> Path:
    """Tokenize every caption of every split once (cached); `splits` maps role ('train', 'val') to CaptionSplit.
    Captions longer than `max_words` words are cut there (one warning): one runaway caption would otherwise pad
    every batch it is drawn in to its length. `before_publish()` may refuse the result (it raises), e.g. when the
    dataset changed meanwhile."""
    spec = token_spec(lowercase, drop_punct, train, max_words)
    out = token_dir(cache_dir, splits, spec)

    def build(tmp):
        tokenized = {role: tokenize([c for caps in split.captions for c in caps], lowercase, drop_punct,
                                    desc=f"tokenize {split.name}", max_words=max_words)
                     for role, split in splits.items()}
        cut = {role: t[3] for role, t in tokenized.items() if t[3]}
        if cut:
            log.warning("Cut %s captions longer than data.max_words=%d words to their first %d words.",
                        " + ".join(f"{n} {role}" for role, n in cut.items()), max_words, max_words)
        # training words by frequency (ties alphabetical), then words seen only outside training (alphabetical)
        train_words, train_ids, _, _ = tokenized[train]
        counts = np.bincount(train_ids, minlength=len(train_words))
        order = sorted(range(len(train_words)), key=lambda i: (-counts[i], train_words[i]))
        words = [train_words[i] for i in order]
        others = sorted({w for role, t in tokenized.items() if role != train for w in t[0]} - set(words))
        index = {w: i for i, w in enumerate(words + others)}
        for role, split in splits.items():
            role_words, ids, lengths, _ = tokenized[role]
            lut = np.array([index[w] for w in role_words], dtype=np.int32)
            np.save(tmp / f"{role}.tokens.npy", lut[ids])
            np.save(tmp / f"{role}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            per_image = np.fromiter((len(c) for c in split.captions), dtype=np.int64, count=len(split.captions))
            np.save(tmp / f"{role}.img_caps.npy", np.concatenate([[0], np.cumsum(per_image)]))
            np.save(tmp / f"{role}.image_ids.npy", np.asarray(split.image_ids, dtype=np.int64))
        meta = dict(spec, n_train_words=len(words), counts=[int(counts[i]) for i in order])
        (tmp / "words.json").write_text(json.dumps({"words": words + others, **meta}), encoding="utf-8")
        log.info("Tokenized %s captions into %s", {r: len(t[2]) for r, t in tokenized.items()}, out)

    return cached_dir(out, build, marker="words.json", before_publish=before_publish)


def load_words(folder: Path) -> dict:
    return json.loads((Path(folder) / "words.json").read_text(encoding="utf-8"))


def coverage(words_meta: dict, vocab_size: int) -> float:
    """Share of training-caption tokens that the vocabulary keeps (the rest become <unk>)."""
    counts = np.asarray(words_meta["counts"], dtype=np.float64)
    return float(counts[:vocab_size].sum() / max(counts.sum(), 1.0))
