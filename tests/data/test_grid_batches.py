"""The data path passes grid features [n, N, D] through as [B, N, D] batches; feature_dim is D."""
import numpy as np
import torch

from captioner.data.datamodule import CaptionBatches, CaptionDataModule


def test_grid_features_come_out_of_the_batches_as_they_were_stored(tmp_path):
    grid = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float16, (3, 4, 5))
    grid[:] = np.arange(60).reshape(3, 4, 5)
    grid.flush()
    grid = np.load(tmp_path / "f.npy", mmap_mode="r")  # as the cache is read
    ids, offsets = np.array([5, 6, 7, 8, 9, 10]), np.array([0, 2, 3, 6])
    ds = CaptionBatches(grid, np.arange(3), ids, offsets, np.arange(3), np.ones(3, dtype=np.int64),
                        image_ids=np.array([10, 11, 12]))
    features, inputs, targets, real = ds.__getitems__([2, 0])
    assert features.dtype == torch.float32 and features.shape == (2, 4, 5)
    assert torch.equal(features, torch.from_numpy(grid[[2, 0]].astype(np.float32)))
    dm = CaptionDataModule({"train": ds, "val": ds})
    assert dm.feature_dim == 5
    feats, image_ids = dm.val_images(2)  # the caption monitor's input
    assert feats.shape == (2, 4, 5) and list(image_ids) == [10, 11]
