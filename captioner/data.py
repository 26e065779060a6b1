"""The data path: cached CNN features + cached token arrays -> padded (features, inputs, targets, real) batches.

Batches are assembled with whole-array numpy indexing (`__getitems__`), so there is no per-sample Python
work in the training loop. Each image is one sample per epoch; `caption_idx` picks which of its captions:
a fixed index (modulo the image's caption count) when >= 0, or a random one per image per epoch when < 0.
`real` holds the flat (row-major) positions of the real targets, the words and <end>, not the pads. It is computed
on the host from the caption lengths, so the loss can score those positions only without asking the device how
many there are (a boolean mask would make a GPU wait for its count at every step).
"""
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from captioner.vocab import END, PAD, START


class CaptionBatches(Dataset):
    """One item per image; `__getitems__` builds a whole padded batch at once.

    After `to_device` (a GPU run with resident features) the word ids live on the device too, and a batch is
    assembled there: one small pinned copy of the batch's rows, caption offsets and real positions, then gathers.
    Its padded length comes from the host-side offsets, so nothing waits for the device.
    """

    def __init__(self, features, feat_rows, ids, offsets, cap_start, cap_count, caption_idx=0, seed=0,
                 image_ids=None):
        self.features, self.feat_rows = features, feat_rows
        self.image_ids = image_ids  # the image id of each item (for captioning validation images)
        self.ids, self.offsets = ids, offsets
        self.cap_start, self.cap_count = cap_start, cap_count
        self.caption_idx, self.seed = caption_idx, seed
        self.pad_to = 1  # round the padded length up to a multiple of this (few shapes for compiled steps)
        self.device_ids = None
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
        """Keep features and word ids on the device: a batch is then built there, with no host-side assembly."""
        self.features = torch.as_tensor(np.asarray(self.features)).to(device)
        self.device_ids = torch.as_tensor(np.asarray(self.ids, dtype=np.int64)).to(device)

    def __getitems__(self, indices):
        idx = np.asarray(indices)
        rows = self.feat_rows[idx]
        caps = self.choice[idx]
        begin, lengths = self.offsets[caps], self.offsets[caps + 1] - self.offsets[caps]
        t = -(-(int(lengths.max()) + 1) // self.pad_to) * self.pad_to  # longest caption plus <end>, rounded up
        pos = np.arange(t)
        real = np.flatnonzero(pos <= lengths[:, None])  # the words and <end> of each row
        if self.device_ids is not None and isinstance(self.features, torch.Tensor):
            return self._assemble_on_device(rows, begin, lengths, real, t)
        if isinstance(self.features, torch.Tensor):
            feats = self.features[torch.from_numpy(rows).to(self.features.device, non_blocking=True)].float()
        else:
            feats = torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))
        words = self.ids[np.minimum(begin[:, None] + pos, len(self.ids) - 1)]
        targets = np.where(pos < lengths[:, None], words, PAD)
        targets[np.arange(len(idx)), lengths] = END
        inputs = np.concatenate([np.full((len(idx), 1), START), targets[:, :-1]], axis=1)
        inputs[inputs == END] = PAD  # <end> is never an input
        return feats, torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(real)

    def _assemble_on_device(self, rows, begin, lengths, real, t):
        """The same batch as the host path, built with gathers on the device from one pinned, async copy."""
        device, n = self.features.device, len(rows)
        packed = torch.from_numpy(np.concatenate([rows, begin, lengths, real]).astype(np.int64))
        if device.type == "cuda":
            packed = packed.pin_memory()  # a pinned source: the copy is queued, the host does not wait
        packed = packed.to(device, non_blocking=True)
        (rows, begin, lengths), real = packed[:3 * n].view(3, n, 1).unbind(0), packed[3 * n:]
        pos = torch.arange(t, device=device)
        words = self.device_ids[(begin + pos).clamp_(max=len(self.device_ids) - 1)]
        targets = words.masked_fill_(pos >= lengths, PAD).masked_fill_(pos == lengths, END)
        inputs = torch.cat([torch.full_like(targets[:, :1], START), targets[:, :-1]], 1)
        inputs.masked_fill_(inputs == END, PAD)  # <end> is never an input
        return self.features[rows.view(-1)].float(), inputs, targets, real

    def __getitem__(self, i):
        return self.__getitems__([i])


def _batch_is_ready(batch):
    return batch


class CaptionDataModule(pl.LightningDataModule):
    """Batches prepared datasets (see captioner.prepare); builds nothing itself.

    `datasets` maps a role ('train', 'val') to CaptionBatches; `val_references` maps each validation image id to
    its reference captions and `val_paths` to its file, for captioning validation images during training.
    `pad_to`: batches padded to a multiple of this length (compiled steps then see few shapes).
    """

    def __init__(self, datasets: dict, batch_size=64, shuffle=True, num_workers=0, resident="auto",
                 val_references=None, val_paths=None, pad_to=1):
        super().__init__()
        self.datasets, self.batch_size, self.shuffle, self.num_workers = datasets, batch_size, shuffle, num_workers
        self.resident = resident  # features on the GPU: "auto" when they fit comfortably, or true/false
        self.val_references, self.val_paths = val_references or {}, val_paths or {}
        self.pad_to = pad_to

    @property
    def feature_dim(self) -> int:
        return self.datasets["train"].features.shape[1]

    def val_images(self, max_images=None):
        """(features [n, dim] float32, image id per row) of the first `max_images` validation images."""
        ds = self.datasets["val"]
        n = len(ds) if max_images is None else min(max_images, len(ds))
        return ds.__getitems__(np.arange(n))[0], ds.image_ids[:n]

    def _loader(self, role, shuffle):
        self.datasets[role].pad_to = self.pad_to
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
        if self.trainer:  # a resumed run's first workers start before ResampleCaptions sets the epoch's draw
            self.datasets["train"].set_epoch(self.trainer.current_epoch)
        return self._loader("train", self.shuffle)

    def val_dataloader(self):
        return self._loader("val", False)


class ResampleCaptions(Callback):
    """Draws new random captions (caption_idx < 0) at the start of every training epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.datasets["train"].set_epoch(trainer.current_epoch)
