"""Feature extraction throughput: the real `extract_split` (reading + decoding JPEGs from disk in DataLoader workers,
preprocessing, forward, writing the float16 cache) against the bare encoder forward on random tensors, in one run on
one machine; then ../shared/bench/ref_limits.py's extract and decode figures, for scale.

    python benchmarks/extract_throughput.py                                   # coco-mini, lite0 + resnet50
    python benchmarks/extract_throughput.py --encoders efficientnet_lite0 --workers 2 --batch-size 32

ResNet-50 runs with random weights (no download needed; the speed is the same). The forward figure is the mean of a
run before and a run after the extraction, as the load of a shared machine drifts. Last line: JSON with, per
encoder, extract_images_per_s, forward_images_per_s and their ratio, the reference's figures and the load average.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from omegaconf import OmegaConf

from captioner.data.coco import load_split
from captioner.features.encoders import build_encoder
from captioner.features.extraction import extract_split

SHARED = Path(__file__).resolve().parents[2] / "shared"
NORM = {"efficientnet_lite0": ([0.498] * 3, [0.502] * 3), "resnet50": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def encoder_for(name):
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        net.fc = torch.nn.Identity()
        return net.eval().requires_grad_(False)
    return build_encoder(OmegaConf.create({"name": name}))


@torch.inference_mode()
def forward_rate(net, n, batch_size, device):
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    net(x[:2])  # warm-up
    t, done = time.perf_counter(), 0
    while done < n:
        net(x)
        done += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, default=SHARED / "datasets" / "coco-mini", help="a COCO-layout folder")
    p.add_argument("--encoders", default="efficientnet_lite0,resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = [load_split(a.images, s) for s in ("train2017", "val2017")]
    n = sum(len(s.files) for s in splits)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "images": n,
           "threads": torch.get_num_threads(), "workers": a.workers, "batch_size": a.batch_size}
    for name in a.encoders.split(","):
        net = encoder_for(name).to(device)
        cfg = OmegaConf.create({"name": name, "weights": None if name != "resnet50" else "random", "image_size": 224,
                                "mean": NORM[name][0], "std": NORM[name][1]})
        before = forward_rate(net, n, a.batch_size, device)
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            for split in splits:  # a fresh cache: every image is read, decoded and encoded
                extract_split(split, cfg, cache, batch_size=a.batch_size, num_workers=a.workers, device=device,
                              encoder=net)
            extract = n / (time.perf_counter() - t)
        after = forward_rate(net, n, a.batch_size, device)
        forward = (before + after) / 2
        out[name] = {"extract_images_per_s": round(extract, 2), "forward_images_per_s": round(forward, 2),
                     "forward_before_after": [round(before, 2), round(after, 2)], "ratio": round(extract / forward, 3)}
        print(name, out[name], flush=True)
    ref = subprocess.run([sys.executable, str(SHARED / "bench" / "ref_limits.py"), "--skip", "seed,fast,beam",
                          "--images", str(a.images)], capture_output=True, text=True)
    out["reference"] = json.loads(ref.stdout.strip().splitlines()[-1]) if ref.returncode == 0 else ref.stderr[-300:]
    out["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
