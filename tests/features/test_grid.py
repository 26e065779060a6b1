"""Grid features: the encoder's last feature map as N = H*W vectors, cached beside (not instead of) pooled ones."""
import json

import numpy as np
import torch

from captioner.features.encoders import build_encoder
from captioner.features.extraction import extract_split, feature_dir, load_features, preprocess_spec
from tests.features.test_features import lite0, write_split


def test_grid_cache_has_one_row_of_vectors_per_image_and_its_own_key_beside_the_pooled_one(tmp_path):
    split = write_split(tmp_path / "data", 5)
    cfg = lite0(image_size=96)  # a 3 x 3 map for Lite0 (stride 32)
    pooled = extract_split(split, cfg, tmp_path / "cache", batch_size=2, num_workers=0)
    grid = extract_split(split, cfg, tmp_path / "cache", batch_size=2, num_workers=0, kind="grid")
    assert grid != pooled and "-grid-" in grid.name and "grid" not in pooled.name
    assert grid == feature_dir(tmp_path / "cache", split, preprocess_spec(cfg, kind="grid"))
    g, ids = load_features(grid)
    p, _ = load_features(pooled)
    assert g.shape == (5, 9, 1280) and g.dtype == np.float16 and isinstance(g, np.memmap)
    assert p.shape == (5, 1280) and list(ids) == list(range(5))
    assert json.loads((grid / "meta.json").read_text())["features"] == "grid"
    assert (grid / ".captioner.json").exists()  # owned and verified like every cache folder
    # the same forward less the pooling: the grid's mean is the pooled vector (both stored as float16)
    np.testing.assert_allclose(g.astype(np.float32).mean(1), p.astype(np.float32), atol=2e-3, rtol=2e-3)
    assert extract_split(split, cfg, tmp_path / "cache", num_workers=0, kind="grid") == grid  # reused


def test_a_224_pixel_resnet_gives_its_7_by_7_map_as_49_vectors(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    import torchvision
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = lite0(name="resnet18", weights=str(weights))
    x = torch.randn(2, 3, 224, 224)
    grid, pooled = build_encoder(cfg, grid=True)(x), build_encoder(cfg)(x)
    assert grid.shape == (2, 49, 512) and pooled.shape == (2, 512)
    torch.testing.assert_close(grid.mean(1), pooled)
