"""Caption tokenization + vocabulary at MS-COCO 2017 scale (616,767 captions), first run and cached run.

The coco-mini captions are replicated to COCO's counts (train 591,753 captions of 118,287 images, val 25,014 of
5,000) and written as COCO annotation files; then `load_split` + `build_tokens` run twice on a fresh cache:
the first run tokenizes with spaCy, the second must be served from the cache.

    python benchmarks/tokenize_captions.py
    python benchmarks/tokenize_captions.py --images ../shared/datasets/coco-mini --scale 0.1   # quicker

Last line: JSON with captions, first_s / cached_s (whole run: reading the annotation files + tokens), the tokens
part alone (first_tokens_s, cached_tokens_s), CPU seconds, words, and the load average while it ran.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from captioner.data.coco import load_split
from captioner.data.vocab import build_tokens, load_words

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco-mini"
SIZES = {"train2017": (118_287, 591_753), "val2017": (5_000, 25_014)}  # images, captions


def write_coco_like(source: Path, root: Path, scale: float) -> int:
    caps = [a["caption"] for s in ("train2017", "val2017")
            for a in json.loads((source / "annotations" / f"captions_{s}.json").read_text())["annotations"]]
    (root / "annotations").mkdir(parents=True)
    total = 0
    for split, (n_images, n_caps) in SIZES.items():
        n_images, n_caps = int(n_images * scale), int(n_caps * scale)
        (root / split).mkdir()
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(n_images)]
        anns = [{"id": c, "image_id": c % n_images, "caption": caps[c % len(caps)]} for c in range(n_caps)]
        ann = {"images": images, "annotations": anns}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
        total += n_caps
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=Path, default=COCO_MINI, help="a COCO-layout folder whose captions are replicated")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of COCO's caption count")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "coco", Path(tmp) / "cache"
        n = write_coco_like(a.images, root, a.scale)
        runs = []
        for _ in range(2):
            t, cpu = time.perf_counter(), time.process_time()
            splits = {"train": load_split(root, "train2017"), "val": load_split(root, "val2017")}
            t_load = time.perf_counter()
            folder = build_tokens(splits, cache)
            # wall seconds (total, reading the annotation files, tokens) and CPU seconds of this process:
            # on a shared machine the CPU figure is the steadier one
            runs.append([time.perf_counter() - t, t_load - t, time.perf_counter() - t_load, time.process_time() - cpu])
            print(f"{n} captions: {runs[-1][0]:.2f} s (annotations {runs[-1][1]:.2f} s, tokens {runs[-1][2]:.2f} s) "
                  f"-> {folder}", flush=True)
        words = len(load_words(folder)["words"])
    (first, first_load, first_tok, first_cpu), (cached, cached_load, cached_tok, cached_cpu) = runs
    print(json.dumps({"captions": n, "first_s": round(first, 2), "first_tokens_s": round(first_tok, 2),
                      "first_cpu_s": round(first_cpu, 2), "cached_s": round(cached, 2),
                      "cached_tokens_s": round(cached_tok, 3), "cached_cpu_s": round(cached_cpu, 2),
                      "annotations_s": round(cached_load, 2), "words": words, "cpus": os.cpu_count(),
                      "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
