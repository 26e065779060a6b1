"""Batched beam search speed (captioner.decoding.beam_search, beam 3, 16 words) against the reference's
`beam3_images_per_s` (../shared/bench/ref_limits.py), run in the same session on the same machine.
Sizes as the reference: features 2048, embeddings 300, LSTM 512, vocabulary 10,000; 5,000 images (500 on CPU).

    python benchmarks/beam_search.py

Last line: JSON with images_per_s, reference_images_per_s, ratio.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.decoding import beam_search
from captioner.model import ShowAndTell, WordEmbedding

REF = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ref_limits.py"


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 5000 if dev == "cuda" else 500
    torch.manual_seed(0)
    model = ShowAndTell(2048, 10_004, WordEmbedding(10_004, 300), 512).to(dev).eval()
    feats = torch.randn(n, 2048, device=dev)

    def run():
        with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            tokens, _, _ = beam_search(model, feats, beam_size=3, max_len=16)
        return tokens.cpu()  # waits for the device

    run()
    start = time.perf_counter()
    run()
    ips = n / (time.perf_counter() - start)
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "images": n,
              "images_per_s": round(ips, 1)}
    if REF.exists():
        out = subprocess.run([sys.executable, str(REF), "--skip", "seed,fast,extract,decode"], capture_output=True,
                             text=True, check=True)
        ref = json.loads(out.stdout.strip().splitlines()[-1])["beam3_images_per_s"]
        result.update(reference_images_per_s=ref, ratio=round(ips / ref, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
