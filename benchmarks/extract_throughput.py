"""Feature extraction throughput: the real `extract_split` (reading + decoding JPEGs from disk in DataLoader workers,
preprocessing, forward, writing the float16 cache; a cold cache, as `python -m captioner.extract` runs it) against
the bare encoder forward (channels-last, inference mode, the same batch size and threads) on the same images already
decoded, in one run on one machine.

    python benchmarks/extract_throughput.py                       # first 512 Flickr8k train images, lite0
    python benchmarks/extract_throughput.py --limit 2000 --encoders efficientnet_lite0,resnet50 --batch-size 32
    python benchmarks/extract_throughput.py --images ../shared/datasets/coco-mini --reference
    python benchmarks/extract_throughput.py --kinds pooled,grid   # attention models' grid features against pooled

--images: a Karpathy split file (its `train` split) or a COCO-layout folder (train2017). ResNet-50 runs with random
weights (no download needed; the speed is the same). The forward figure is the mean of a run before and a run after
the extraction, as the load of a shared machine drifts. `max_abs_diff`: the cached features against the plain
(contiguous, float32) forward of the first --compare images. With --kinds pooled,grid each encoder is measured for
both feature kinds (the grid: its last feature map, [N, D] per image) and `grid_vs_pooled` is the ratio of their
extraction rates. Last line: JSON.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from omegaconf import OmegaConf

from captioner.data.coco import CaptionSplit, load_karpathy_split, load_split
from captioner.features.encoders import GridFeatures, build_encoder, normalizing, resizing
from captioner.features.extraction import (ImageFiles, cpu_plan, extract_split, load_features, torch_threads,
                                           usable_cores)

SHARED = next((p / "shared" for p in Path(__file__).resolve().parents if (p / "shared").is_dir()), Path("shared"))
NORM = {"efficientnet_lite0": ([0.498] * 3, [0.502] * 3), "resnet50": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def encoder_for(name, grid=False):
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        net.fc = torch.nn.Identity()
        if grid:
            net = GridFeatures(torch.nn.Sequential(*list(net.children())[:-2]))
        return net.eval().requires_grad_(False)
    return build_encoder(OmegaConf.create({"name": name}), grid=grid)


def first_images(path: Path, n: int) -> CaptionSplit:
    s = load_karpathy_split(path, path.parent / "images", ["train"]) if path.suffix == ".json" \
        else load_split(path, "train2017")
    return CaptionSplit(s.name, s.image_dir, s.annotation_file, s.image_ids[:n], s.files[:n], s.captions[:n])


@torch.inference_mode()
def forward(net, images, batch_size, channels_last=True):
    """(images/s, features) of the plain forward over already-decoded, normalised images."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    net(images[:2].contiguous(memory_format=fmt))  # warm-up
    t, out = time.perf_counter(), []
    for s in range(0, len(images), batch_size):
        out.append(net(images[s:s + batch_size].contiguous(memory_format=fmt)).float().cpu())
    return len(images) / (time.perf_counter() - t), torch.cat(out)


def cpu_name():
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, default=SHARED / "datasets" / "flickr8k" / "dataset_flickr8k.json")
    p.add_argument("--limit", type=int, default=512, help="the first N images")
    p.add_argument("--encoders", default="efficientnet_lite0")
    p.add_argument("--kinds", default="pooled", help="feature kinds, of pooled and grid")
    p.add_argument("--batch-size", type=int, default=64, help="encoder.batch_size")
    p.add_argument("--workers", type=int, default=2, help="encoder.num_workers (on the CPU, capped by cpu_plan)")
    p.add_argument("--compare", type=int, default=64, help="images checked against the plain float32 forward")
    p.add_argument("--reference", action="store_true", help="also run ../shared/bench/ref_limits.py (COCO layout)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = first_images(a.images, a.limit)
    n = len(split.files)
    threads = min(cpu_plan(usable_cores())[0], torch.get_num_threads()) if device.type == "cpu" \
        else torch.get_num_threads()
    out = {"machine": {"cpu": cpu_name(), "cores": usable_cores(), "device": torch.cuda.get_device_name()
                       if device.type == "cuda" else "cpu", "torch": torch.__version__},
           "images": n, "batch_size": a.batch_size}
    for name in a.encoders.split(","):
        files = ImageFiles([split.image_dir / f for f in split.files], resizing(224), 224)
        images = normalizing(*NORM[name])(torch.stack([files[i][0] for i in range(n)])).to(device)
        cfg = OmegaConf.create({"name": name, "weights": None if name != "resnet50" else "random", "image_size": 224,
                                "mean": NORM[name][0], "std": NORM[name][1]})
        for kind in a.kinds.split(","):
            net = encoder_for(name, grid=kind == "grid").to(device)
            with torch_threads(threads):
                before, _ = forward(net, images, a.batch_size)
            with tempfile.TemporaryDirectory() as cache:
                t = time.perf_counter()
                folder = extract_split(split, cfg, cache, batch_size=a.batch_size, num_workers=a.workers,
                                       device=device, encoder=net, kind=kind)
                extract = n / (time.perf_counter() - t)
                meta = json.loads((folder / "meta.json").read_text())
                cached = torch.from_numpy(np.asarray(load_features(folder)[0][:a.compare], np.float32))
            with torch_threads(threads):
                after, _ = forward(net, images, a.batch_size)
                _, plain = forward(net, images[:a.compare], a.batch_size, channels_last=False)
            rate, key = (before + after) / 2, name if kind == "pooled" else f"{name}-{kind}"
            out.update(threads=meta["threads"], workers=meta["workers"])
            out[key] = {"extract_images_per_s": round(extract, 2), "forward_images_per_s": round(rate, 2),
                        "forward_before_after": [round(before, 2), round(after, 2)], "ratio": round(extract / rate, 3),
                        "feature_shape": list(cached.shape[1:]),
                        "max_abs_diff": round(float((cached - plain).abs().max()), 5),
                        "feature_max_abs": round(float(plain.abs().max()), 3)}
            print(key, out[key], flush=True)
        if name in out and f"{name}-grid" in out:
            out[f"{name}-grid"]["grid_vs_pooled"] = round(out[f"{name}-grid"]["extract_images_per_s"]
                                                          / out[name]["extract_images_per_s"], 3)
    if a.reference:
        ref = subprocess.run([sys.executable, str(SHARED / "bench" / "ref_limits.py"), "--skip", "seed,fast,beam",
                              "--images", str(a.images)], capture_output=True, text=True)
        out["reference"] = json.loads(ref.stdout.strip().splitlines()[-1]) if ref.returncode == 0 else ref.stderr[-300:]
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
