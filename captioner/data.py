"""The data path: cached CNN features + cached token arrays -> padded (features, inputs, targets) batches.

Batches are assembled with whole-array numpy indexing (`__getitems__`), so there is no per-sample Python
work in the training loop. Each image is one sample per epoch; `caption_idx` picks which of its captions:
a fixed index (modulo the image's caption count) when >= 0, or a random one per image per epoch when < 0.
"""
import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from captioner.coco import load_splits
from captioner.features import extract_split, feature_dir, load_features, preprocess_spec
from captioner.scenes import make_scenes
from captioner.shapes import make_shapes
from captioner.vocab import END, PAD, START, Vocabulary, build_tokens, coverage, load_words, token_dir

log = logging.getLogger(__name__)


class CaptionBatches(Dataset):
    """One item per image; `__getitems__` builds a whole padded batch at once."""

    def __init__(self, features, feat_rows, ids, offsets, cap_start, cap_count, caption_idx=0, seed=0):
        self.features, self.feat_rows = features, feat_rows
        self.ids, self.offsets = ids, offsets
        self.cap_start, self.cap_count = cap_start, cap_count
        self.caption_idx, self.seed = caption_idx, seed
        self.set_epoch(0)

    def __len__(self):
        return len(self.feat_rows)

    def set_epoch(self, epoch: int):
        if self.caption_idx >= 0:
            self.choice = self.cap_start + self.caption_idx % self.cap_count
        else:  # same draw on every rank and worker: it depends on (seed, epoch) only
            rng = np.random.default_rng([self.seed, epoch])
            self.choice = self.cap_start + (rng.random(len(self)) * self.cap_count).astype(np.int64)

    def to_device(self, device):
        """Keep the features on the device: a batch is then one gather there, with no host-to-device copy."""
        self.features = torch.as_tensor(np.asarray(self.features)).to(device)

    def __getitems__(self, indices):
        idx = np.asarray(indices)
        rows = self.feat_rows[idx]
        if isinstance(self.features, torch.Tensor):
            feats = self.features[torch.from_numpy(rows).to(self.features.device, non_blocking=True)].float()
        else:
            feats = torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))
        caps = self.choice[idx]
        begin, lengths = self.offsets[caps], self.offsets[caps + 1] - self.offsets[caps]
        t = int(lengths.max()) + 1  # pad to this batch's longest caption, plus <end>
        pos = np.arange(t)
        words = self.ids[np.minimum(begin[:, None] + pos, len(self.ids) - 1)]
        targets = np.where(pos < lengths[:, None], words, PAD)
        targets[np.arange(len(idx)), lengths] = END
        inputs = np.concatenate([np.full((len(idx), 1), START), targets[:, :-1]], axis=1)
        inputs[inputs == END] = PAD  # <end> is never an input
        return feats, torch.from_numpy(inputs), torch.from_numpy(targets)

    def __getitem__(self, i):
        return self.__getitems__([i])


def _batch_is_ready(batch):
    return batch


class CaptionDataModule(pl.LightningDataModule):
    def __init__(self, root=None, splits=None, encoder=None, cache_dir=None, vocab_size=10000, caption_idx=0,
                 shuffle=True, batch_size=64, seed=0, image_size=None, lowercase=True, drop_punct=True, generate=None,
                 num_workers=0, extract_batch_size=64, extract_workers=2, name="coco", resident="auto",
                 datasets=None, vocab=None, split_file=None):
        super().__init__()
        self.root, self.splits, self.encoder_cfg = root and Path(root), dict(splits or {}), encoder
        self.cache_dir, self.vocab_size, self.caption_idx = cache_dir and Path(cache_dir), vocab_size, caption_idx
        self.shuffle, self.batch_size, self.seed, self.image_size = shuffle, batch_size, seed, image_size
        self.lowercase, self.drop_punct, self.generate, self.name = lowercase, drop_punct, generate, name
        self.num_workers, self.extract_batch_size, self.extract_workers = num_workers, extract_batch_size, extract_workers
        self.split_file = split_file  # a Karpathy split file (dataset_*.json) instead of the COCO layout
        self.resident = resident  # features on the GPU: "auto" when they fit comfortably, or true/false
        self.vocab = vocab
        self.datasets = datasets or {}  # given directly (benchmarks) or built from the caches in setup()
        self.image_ids, self.references, self.image_paths = {}, {}, {}
        self._splits = None

    @property
    def feature_dim(self) -> int:
        return self.datasets["train"].features.shape[1]

    @property
    def preprocess(self) -> dict:
        return preprocess_spec(self.encoder_cfg, self.image_size)

    def _load_splits(self):
        # Read once: prepare_data and setup both need the splits, and COCO's train file takes seconds to parse.
        if self._splits is None:
            self._splits = load_splits(self.root, self.splits, self.split_file)
        return self._splits

    def prepare_data(self):
        """Build every cache once (Lightning runs this on one process per node)."""
        if self.datasets:
            return
        if self.generate:
            (make_scenes if self.name == "scenes" else make_shapes)(self.root, self.generate)
        splits = self._load_splits()
        build_tokens(splits, self.cache_dir, self.lowercase, self.drop_punct)
        for split in splits.values():
            if not (feature_dir(self.cache_dir, split, self.preprocess) / "meta.json").exists():
                log.info("Features for %s with %s are missing: extracting them now.", split.name, self.encoder_cfg.name)
            extract_split(split, self.encoder_cfg, self.cache_dir, self.image_size, self.extract_batch_size,
                          self.extract_workers)

    def setup(self, stage=None):
        if self.datasets:
            return
        splits = self._load_splits()
        tokens = token_dir(self.cache_dir, splits, {"tokenizer": "spacy-blank-en", "lowercase": self.lowercase,
                                                    "drop_punct": self.drop_punct, "train": "train"})
        self.token_folder = tokens
        meta = load_words(tokens)
        self.vocab = Vocabulary.from_words(meta["words"], meta["n_train_words"], self.vocab_size)
        self.coverage = coverage(meta, self.vocab_size)
        log.info("Vocabulary: %d words + %d special tokens, covering %.1f%% of training tokens.",
                 len(self.vocab) - 4, 4, 100 * self.coverage)
        for role, split in splits.items():
            feats, feat_ids = load_features(feature_dir(self.cache_dir, split, self.preprocess))
            # for decoding during training: which image each feature row is, its captions and its file
            self.image_ids[role] = feat_ids
            self.references[role] = dict(zip(split.image_ids, split.captions))
            self.image_paths[role] = {i: split.image_dir / f for i, f in zip(split.image_ids, split.files)}
            tok_ids = np.load(tokens / f"{role}.image_ids.npy")
            img_caps = np.load(tokens / f"{role}.img_caps.npy")
            pos = np.searchsorted(tok_ids, feat_ids)  # both sorted by image id; features may skip unreadable images
            self.datasets[role] = CaptionBatches(
                feats, np.arange(len(feat_ids)),
                self.vocab.encode(np.load(tokens / f"{role}.tokens.npy", mmap_mode="r")),
                np.load(tokens / f"{role}.offsets.npy"), img_caps[pos], img_caps[pos + 1] - img_caps[pos],
                self.caption_idx, self.seed)

    def remap_words(self, remap: dict):
        """Point some out-of-vocabulary word ids at other vocabulary ids (instead of <unk>) and re-encode."""
        for word_id, vocab_id in remap.items():
            self.vocab.lut[word_id] = vocab_id
        for role, ds in self.datasets.items():
            ds.ids = self.vocab.encode(np.load(self.token_folder / f"{role}.tokens.npy", mmap_mode="r"))

    def _loader(self, role, shuffle):
        return DataLoader(self.datasets[role], batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=_batch_is_ready, num_workers=self.num_workers,
                          persistent_workers=False)  # workers must see set_epoch()

    def _place_features(self):
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if device.type != "cuda" or self.resident is False or self.num_workers > 0:
            return
        need = sum(ds.features.nbytes for ds in self.datasets.values() if not isinstance(ds.features, torch.Tensor))
        if self.resident is True or need < 0.5 * torch.cuda.mem_get_info(device)[0]:
            for ds in self.datasets.values():
                if not isinstance(ds.features, torch.Tensor):
                    ds.to_device(device)

    def train_dataloader(self):
        self._place_features()
        return self._loader("train", self.shuffle)

    def val_dataloader(self):
        return self._loader("val", False)


class ResampleCaptions(Callback):
    """Draws new random captions (caption_idx < 0) at the start of every training epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.datasets["train"].set_epoch(trainer.current_epoch)
