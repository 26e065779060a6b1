"""The data path: cached CNN features + cached token arrays -> padded (features, inputs, targets, real) batches.

Batches are assembled with whole-array numpy indexing (`__getitems__`), so there is no per-sample Python
work in the training loop. Each image is `per_image` samples per epoch (`seq_per_img`; 1 for val) and
`caption_idx` picks which of its captions: fixed ones (caption_idx, caption_idx + 1, ... modulo the image's caption
count) when >= 0, or distinct random ones (a new draw per image per epoch) when < 0. With per_image equal to the
caption count, an epoch sees every caption once; the samples of one image are spread over the epoch, not batched
together, so a batch holds as many different images as it can.
`real` holds the flat (row-major) positions of the real targets, the words and <end>, not the pads. It is computed
on the host from the caption lengths, so the loss can score those positions only without asking the device how
many there are (a boolean mask would make a GPU wait for its count at every step).
"""
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from captioner.data.vocab import END, PAD, START

AFTER_IDS = np.array([PAD, END, START])  # token index len(ids) + k is AFTER_IDS[k]


class CaptionBatches(Dataset):
    """One item per image; `__getitems__` builds a whole padded batch at once.

    A batch's tokens are indices into the word ids followed by AFTER_IDS, computed on the host from the caption
    offsets (`token_index`). After `to_device` (a GPU run with resident features) the word ids live on the device
    too, and a batch is assembled there: one small pinned copy of its rows, real positions and token indices, then
    gathers. Its padded length comes from the host-side offsets, so nothing waits for the device.
    """

    def __init__(self, features, feat_rows, ids, offsets, cap_start, cap_count, caption_idx=0, seed=0,
                 image_ids=None, per_image=1):
        self.features, self.feat_rows = features, feat_rows
        self.per_image = int(per_image)
        self.image_ids = image_ids  # the image id of each item (for captioning validation images)
        self.ids, self.offsets = ids, offsets
        self.cap_start, self.cap_count = cap_start, cap_count
        self.caption_idx, self.seed = caption_idx, seed
        self.pad_to = 1  # round the padded length up to a multiple of this (few shapes for compiled steps)
        self.pad_real = False  # pad `real` to a few lengths as well (CUDA-graphed steps: real_length)
        self.device_ids = None
        self.set_epoch(0)

    def __len__(self):
        return len(self.feat_rows) * self.per_image

    def image_rows(self, indices):
        """The image (row of feat_rows) of each sample index: sample i is image i % n, its (i // n)-th caption."""
        return np.asarray(indices) % len(self.feat_rows)

    def set_epoch(self, epoch: int):
        """Chooses each sample's caption for this epoch: `choice` [per_image * n], image-major blocks of n."""
        j = np.arange(self.per_image)[:, None]
        if self.caption_idx >= 0:
            order = self.caption_idx + j
        else:  # same draw on every rank and worker: it depends on (seed, epoch) only
            rng = np.random.default_rng([self.seed, epoch])
            if self.per_image == 1:  # the draw of earlier versions, so their runs repeat exactly
                order = (rng.random(len(self.feat_rows)) * self.cap_count).astype(np.int64)[None]
            else:  # distinct captions: a random permutation of each image's captions (invalid slots sort last)
                keys = rng.random((len(self.feat_rows), int(self.cap_count.max())))
                keys[np.arange(keys.shape[1]) >= self.cap_count[:, None]] = np.inf
                order = np.argsort(keys, 1).T[j % keys.shape[1]][:, 0]
        self.choice = (self.cap_start + order % self.cap_count).ravel()

    def to_device(self, device):
        """Keep features and word ids on the device: a batch is then built there, with no host-side assembly."""
        self.features = torch.as_tensor(np.asarray(self.features)).to(device)
        ids = np.concatenate([np.asarray(self.ids, dtype=np.int64), AFTER_IDS])
        self.device_ids = torch.as_tensor(ids).to(device)

    def token_index(self, begin, lengths, t):
        """[2, n, t]: where each input and target of a batch comes from in the ids followed by AFTER_IDS: a caption's
        words, then <end>, then <pad>; the inputs are the targets shifted right behind <start>, with <end> (never an
        input) as <pad>."""
        n_ids, pos, lengths = len(self.ids), np.arange(t), lengths[:, None]
        word = begin[:, None] + pos
        targets = np.where(pos < lengths, word, np.where(pos == lengths, n_ids + 1, n_ids))
        inputs = np.empty_like(targets)
        inputs[:, 0] = n_ids + 2
        inputs[:, 1:] = np.where(pos[:-1] < lengths, word[:, :-1], n_ids)
        return np.stack([inputs, targets])

    def host_tokens(self, index):
        """The tokens at `token_index` positions, gathered on the host from the (possibly memory-mapped) ids."""
        n_ids = len(self.ids)
        tokens = np.asarray(self.ids[np.minimum(index, n_ids - 1)], dtype=np.int64)
        special = index >= n_ids
        tokens[special] = AFTER_IDS[index[special] - n_ids]
        return tokens

    def __getitems__(self, indices):
        idx = np.asarray(indices)
        rows = self.feat_rows[self.image_rows(idx)]
        caps = self.choice[idx]
        begin, lengths = self.offsets[caps], self.offsets[caps + 1] - self.offsets[caps]
        # the longest caption plus <end>, rounded up; with pad_real, at least one <pad> column, where padded
        # entries of `real` point (its last position: its target is <pad>, which the loss ignores)
        t = -(-(int(lengths.max()) + 1 + self.pad_real) // self.pad_to) * self.pad_to
        real = np.flatnonzero(np.arange(t) <= lengths[:, None])  # the words and <end> of each row
        if self.pad_real:
            real = np.concatenate([real, np.full(real_length(len(real)) - len(real), len(rows) * t - 1)])
        index = self.token_index(begin, lengths, t)
        if self.device_ids is not None and isinstance(self.features, torch.Tensor):
            return self._assemble_on_device(rows, index, real)
        if isinstance(self.features, torch.Tensor):
            feats = self.features[torch.from_numpy(rows).to(self.features.device, non_blocking=True)].float()
        else:
            feats = torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))
        inputs, targets = torch.from_numpy(self.host_tokens(index))
        return feats, inputs, targets, torch.from_numpy(real)

    def _assemble_on_device(self, rows, index, real):
        """The same batch as the host path, from one pinned, async copy of the host-side indices and two gathers: a
        GPU step of this model is bound by the host's launches, so the batch costs as few of them as it can."""
        device, n = self.features.device, len(rows)
        packed = torch.from_numpy(np.concatenate([rows, real, index.ravel()]))
        if device.type == "cuda":
            packed = packed.pin_memory()  # a pinned source: the copy is queued, the host does not wait
        packed = packed.to(device, non_blocking=True)
        rows, real, index = packed[:n], packed[n:n + len(real)], packed[n + len(real):].view(index.shape)
        inputs, targets = self.device_ids[index]
        return self.features[rows].float(), inputs, targets, real

    def __getitem__(self, i):
        return self.__getitems__([i])


def real_length(n: int) -> int:
    """`n` real positions padded to few lengths (steps of 1/16 to 1/8 of n): a CUDA-graphed step is captured once
    per batch shape, and the number of real tokens differs in almost every batch."""
    step = 2 ** max(4, n.bit_length() - 4)
    return -(-n // step) * step


def _batch_is_ready(batch):
    return batch


class CaptionDataModule(pl.LightningDataModule):
    """Batches prepared datasets (see captioner.training.prepare); builds nothing itself.

    `datasets` maps a role ('train', 'val') to CaptionBatches; `val_references` maps each validation image id to
    its reference captions and `val_paths` to its file, for captioning validation images during training.
    `pad_to`: batches padded to a multiple of this length (compiled steps then see few shapes); `pad_real`: real
    positions padded to few counts too (CUDA-graphed steps, `compile=graphs`). Both apply to every role: the padding
    is ignored by the loss, and one dataset may serve several roles (benchmarks and tests use one for train and val).
    """

    def __init__(self, datasets: dict, batch_size=64, shuffle=True, num_workers=0, resident="auto",
                 val_references=None, val_paths=None, pad_to=1, pad_real=False):
        super().__init__()
        self.datasets, self.batch_size, self.shuffle, self.num_workers = datasets, batch_size, shuffle, num_workers
        self.resident = resident  # features on the GPU: "auto" when they fit comfortably, or true/false
        self.val_references, self.val_paths = val_references or {}, val_paths or {}
        self.pad_to, self.pad_real = pad_to, pad_real

    @property
    def feature_dim(self) -> int:
        return self.datasets["train"].features.shape[-1]  # pooled [n, dim] or grid [n, N, dim]

    def val_images(self, max_images=None):
        """(features [n, dim] or grid [n, N, dim] float32, image id per row) of the first `max_images` validation
        images."""
        ds = self.datasets["val"]
        n = len(ds) if max_images is None else min(max_images, len(ds))
        return ds.__getitems__(np.arange(n))[0], ds.image_ids[:n]

    def _loader(self, role, shuffle):
        self.datasets[role].pad_to = self.pad_to
        self.datasets[role].pad_real = self.pad_real
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

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """A batch assembled on the device (resident data) is returned as it is, not walked tensor by tensor: a GPU
        step of this model is bound by host time, and Lightning's walk costs some of it."""
        if all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

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
