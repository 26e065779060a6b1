"""Extraction on the CPU: the channels-last, inference-mode path with its own thread/worker split gives the
features of the plain forward, and the split is sane for any core count."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from captioner.data.coco import CaptionSplit
from captioner.features.encoders import build_encoder, normalizing, resizing
from captioner.features.extraction import ImageFiles, cpu_plan, extract_split, load_features

FLICKR8K = next((p / "shared" / "datasets" / "flickr8k" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "datasets" / "flickr8k" / "images").is_dir()), None)


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_leaves_the_forward_most_cores_and_never_oversubscribes_much(cores):
    threads, workers = cpu_plan(cores)
    assert 1 <= threads <= cores and 0 <= workers <= max(1, cores // 4)
    assert threads + workers <= cores + 1  # 2-3 cores: one mostly idle worker shares a core with the forward
    if cores >= 2:
        assert workers >= 1  # decoding overlaps the forward
    assert {1: (1, 0), 2: (2, 1), 16: (14, 2)}.get(cores, (threads, workers)) == (threads, workers)


@pytest.mark.slow
@pytest.mark.skipif(FLICKR8K is None, reason="the shared Flickr8k copy (shared/datasets/flickr8k) is not here")
def test_cpu_extraction_gives_the_plain_forwards_features_on_real_photos(tmp_path):
    names = sorted(p.name for p in (FLICKR8K / "images").glob("*.jpg"))[:6]
    split = CaptionSplit("train", FLICKR8K / "images", FLICKR8K / "dataset_flickr8k.json", list(range(6)), names,
                         [["a caption"]] * 6)
    cfg = OmegaConf.create({"name": "efficientnet_lite0", "weights": None, "image_size": 224,
                            "mean": [0.498] * 3, "std": [0.502] * 3})
    threads = torch.get_num_threads()
    folder = extract_split(split, cfg, tmp_path, batch_size=4, num_workers=4, device="cpu")
    assert torch.get_num_threads() == threads  # the forward's thread count is the extraction's only
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["channels_last"] is True and meta["workers"] <= 4 and meta["threads"] >= 1

    files = ImageFiles([split.image_dir / f for f in names], resizing(224), 224)
    x = normalizing(cfg.mean, cfg.std)(torch.stack([files[i][0] for i in range(6)]))
    with torch.no_grad():  # the plain path: contiguous float32, no inference mode
        plain = build_encoder(cfg)(x).numpy()
    feats, ids = load_features(folder)
    assert ids.tolist() == list(range(6)) and feats.dtype == np.float16
    np.testing.assert_allclose(np.asarray(feats, np.float32), plain, atol=1e-2, rtol=0)
