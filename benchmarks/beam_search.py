"""Batched beam search speed (captioner.models.decoding.beam_search, beam 3, 16 words) against the reference's
`beam3_images_per_s` (ref_limits.py, see benchmarks/reference.py), run in the same session on the same machine.
Sizes as the reference: features 2048, embeddings 300, LSTM 512, vocabulary 10,000; 5,000 images (500 on CPU).

    python benchmarks/beam_search.py [--repeats 3] [--ref PATH]

Both sides are timed `--repeats` times, interleaved (captioner, reference, captioner, ...), and the best of
each is compared, so a burst of other work on a shared machine hits both alike. On a GPU the reference runs
with `--scale coco`: at its small scale it holds only 4,096 feature rows, decodes those, and divides by 5,000.

Last line: JSON with images_per_s, reference_images_per_s, ratio (and every timing).
"""
import argparse
import json
import time

import torch

from captioner.models.decoding import beam_search
from captioner.models.show_and_tell import ShowAndTell, WordEmbedding
from reference import reference_path, run_reference


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref", default=None, help="ref_limits.py (default: $CAPTIONER_REF or ../shared/bench/)")
    p.add_argument("--no-reference", action="store_true")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 5000 if dev == "cuda" else 500
    torch.manual_seed(0)
    model = ShowAndTell(2048, 10_004, WordEmbedding(10_004, 300), 512).to(dev).eval()
    feats = torch.randn(n, 2048, device=dev)

    def run():
        with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            tokens, _, _ = beam_search(model, feats, beam_size=3, max_len=16)
        return tokens.cpu()  # waits for the device

    ref = None if a.no_reference else reference_path(a.ref)
    ref_args = ["--skip", "seed,fast,extract,decode"] + (["--scale", "coco"] if dev == "cuda" else [])
    run()  # warm-up: allocator, cuDNN plans
    ours, theirs = [], []
    for _ in range(a.repeats):
        start = time.perf_counter()
        run()
        ours.append(round(n / (time.perf_counter() - start), 1))
        if ref:
            theirs.append(run_reference(ref, *ref_args)["beam3_images_per_s"])
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
              "images": n, "images_per_s": max(ours), "runs": ours}
    if theirs:
        result.update(reference_images_per_s=max(theirs), reference_runs=theirs,
                      ratio=round(max(ours) / max(theirs), 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
