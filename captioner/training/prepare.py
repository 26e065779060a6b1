"""Preparation: everything built once, cached, and then only read — generated datasets, tokenized captions, CNN
features, the vocabulary and its word vectors.

    prepared = prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir)   # build or find every cache
    vocab = prepared.vocabulary(cfg.vocab_size, cfg.vocab_min_count)  # a prefix of the cached words
    datasets = prepared.datasets(vocab, caption_idx=0, seed=0)        # role -> CaptionBatches

Each cache folder is made by `captioner.caches.cached_dir` (lock, build in a temporary folder, rename), so
concurrent runs build it once and an interrupted build never looks finished. `captioner.run`,
`captioner.extract` and `captioner.evaluate` come here; nothing else writes caches.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.data.coco import CaptionSplit, load_splits
from captioner.data.datamodule import CaptionBatches
from captioner.features.extraction import extract_split, load_features, preprocess_spec
from captioner.data.scenes import make_scenes
from captioner.data.shapes import make_shapes
from captioner.data.vocab import MAX_WORDS, SPECIALS, Vocabulary, build_tokens, coverage, load_words
from captioner.utils import CaptionerError
from captioner.caches import generation

log = logging.getLogger(__name__)

GENERATORS = {"shapes": make_shapes, "scenes": make_scenes}  # built-in datasets, written as COCO on first use


def read_splits(data):
    """(role ('train', 'val', ...) -> CaptionSplit of the `data` config, generating a built-in dataset first;
    a check that raises when another run has rebuilt the dataset since: caches of it run it before they appear)."""
    if data.get("generate"):
        GENERATORS[data.name](data.root, data.generate)
    built = generation(data.root)  # before reading anything of it

    def unchanged():
        if generation(data.root) != built:
            raise CaptionerError(f"The dataset at {data.root} was rebuilt by another run (other data.generate "
                                 f"settings) while this one read it, so its caches are not saved; run one at a "
                                 f"time or give each its own data.root.")
    return load_splits(data.root, data.splits, data.get("split_file")), unchanged


def split_features(split: CaptionSplit, encoder, cache_dir, image_size=None, unchanged=None, kind="pooled"):
    """(features float16 [n, dim] or grid [n, N, dim] memory-mapped, image id per row) of a split, extracting them
    once (logged)."""
    folder = extract_split(split, encoder, cache_dir, image_size, encoder.batch_size, encoder.num_workers,
                           before_publish=unchanged, kind=kind)
    return load_features(folder)


@dataclass
class Prepared:
    splits: dict  # role -> CaptionSplit (image ids, files, reference captions)
    features: dict  # role -> (features, image id per row); unreadable images have no row
    tokens: Path  # the token cache folder (captioner.data.vocab)
    preprocess: dict  # encoder name, weights, image size, mean/std: stored in every checkpoint

    @property
    def feature_dim(self) -> int:
        return int(self.features["train"][0].shape[-1])

    @property
    def words(self) -> dict:
        return load_words(self.tokens)

    def vocabulary(self, size: int, min_count=None) -> Vocabulary:
        """The `size` most frequent training words, less those seen fewer than `min_count` times (both apply)."""
        meta = self.words
        vocab = Vocabulary.from_words(meta["words"], meta["n_train_words"], size, meta["counts"], min_count)
        kept = len(vocab) - len(SPECIALS)
        log.info("Vocabulary: %d words (vocab_size=%d, vocab_min_count=%s) + %d special tokens, covering %.1f%% of "
                 "training tokens.", kept, size, min_count, len(SPECIALS), 100 * coverage(meta, kept))
        return vocab

    def datasets(self, vocab: Vocabulary, caption_idx=0, seed=0, seq_per_img=1) -> dict:
        """Role -> CaptionBatches: cached features and captions encoded with `vocab` (its lookup table as it is
        now, so remap words into it before calling this). Training sees `seq_per_img` captions per image per
        epoch; the other roles one."""
        out = {}
        for role in self.splits:
            feats, feat_ids = self.features[role]
            tok_ids = np.load(self.tokens / f"{role}.image_ids.npy")
            img_caps = np.load(self.tokens / f"{role}.img_caps.npy")
            pos = np.searchsorted(tok_ids, feat_ids)  # both sorted by image id; features may skip unreadable images
            out[role] = CaptionBatches(
                feats, np.arange(len(feat_ids)),
                vocab.encode(np.load(self.tokens / f"{role}.tokens.npy", mmap_mode="r")),
                np.load(self.tokens / f"{role}.offsets.npy"), img_caps[pos], img_caps[pos + 1] - img_caps[pos],
                caption_idx, seed, image_ids=feat_ids, per_image=seq_per_img if role == "train" else 1)
        return out


def prepare(data, encoder, cache_dir, roles=None, kind="pooled") -> Prepared:
    """Build (or find) every cache that training on `data` with `encoder` needs: the dataset itself when it is
    generated, the tokens of all its splits, and the features (of `kind`, the model's feature_kind: "pooled" or
    "grid") of the splits in `roles` (default: all)."""
    splits, unchanged = read_splits(data)
    tokens = build_tokens(splits, cache_dir, data.lowercase, data.drop_punct,
                          max_words=data.get("max_words", MAX_WORDS), before_publish=unchanged)
    roles = list(splits) if roles is None else roles
    features = {role: split_features(splits[role], encoder, cache_dir, data.get("image_size"), unchanged, kind)
                for role in roles}
    return Prepared(splits, features, tokens, preprocess_spec(encoder, data.get("image_size"), kind))


def word_vectors(nlp, vocab: Vocabulary, embeddings: dict, words=None):
    """(embeddings config with its dim and coverage, pretrained matrix or None, has_vector or None) for `vocab`.

    With `embeddings.nearest`, out-of-vocabulary words with a vector are pointed at the nearest kept word in
    `vocab.lut` (instead of <unk>): call this before `Prepared.datasets`, which encodes with that table.
    """
    from captioner.data.embeddings import embedding_matrix, nearest_kept

    emb = dict(embeddings)
    if nlp is None:  # learned word vectors
        emb["dim"] = int(emb["dim"])
        return emb, None, None
    pretrained, has_vector = embedding_matrix(nlp, vocab.itos)
    emb["dim"] = pretrained.shape[1]
    emb["coverage"] = float(has_vector[len(SPECIALS):].float().mean()) if len(has_vector) > len(SPECIALS) else 0.0
    log.info("Word vectors %s: %.1f%% of vocabulary words have a pretrained vector.", emb.get("name"),
             100 * emb["coverage"])
    if emb.get("nearest") and words is not None:
        remap = nearest_kept(nlp, vocab.itos, words, len(vocab) - len(SPECIALS))
        for word_id, vocab_id in remap.items():
            vocab.lut[word_id] = vocab_id
        log.info("Mapped %d out-of-vocabulary words to their nearest kept word instead of <unk>.", len(remap))
    return emb, pretrained, has_vector
