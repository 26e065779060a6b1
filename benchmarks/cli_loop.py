"""The real training command, `python -m captioner.run` with its default callbacks (checkpoints, progress bar,
TensorBoard, loss history, caption monitor), timed on the training benchmark's synthetic data, and its
captions/s next to benchmarks/train_throughput.py's (the bare Trainer) in the same session.

    python benchmarks/cli_loop.py                    # CPU: 4,096 synthetic captions (the benchmark's small scale)
    python benchmarks/cli_loop.py --scale coco       # 118,287 captions (GPU); --bench-cps N skips re-running it
    python benchmarks/cli_loop.py --shapes           # experiment=shapes embeddings=learned: steps/s
    python benchmarks/cli_loop.py -- trainer.precision=32-true   # more captioner.run overrides
    python benchmarks/cli_loop.py --scale coco -- compile=graphs   # the CUDA-graphed step (and its benchmark)

The synthetic set is written in the COCO layout with its caches (random float16 "ResNet-50" features, token
arrays of the words w1..w9999 with the benchmark's lengths and Zipf frequencies: train_throughput.caption_arrays)
under the keys captioner.run looks up, so the command runs as on real data without images, spaCy or a CNN.
`--shapes` builds (or reuses, e.g. from $CAPTIONER_DATA_DIR) the shapes set and its caches as a user's first run
would.

Rates come from the TensorBoard events of the run: `captions_per_s` (or `steps_per_s`) over training steps
within an epoch after the first; `epoch_captions_per_s` (or `epoch_steps_per_s`) from one validation to the
next (training, validation and checkpoints). Last line: JSON.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from captioner.data.coco import load_splits
from captioner.features.extraction import feature_dir, preprocess_spec
from captioner.caches import cached_dir
from captioner.data.vocab import token_dir, token_spec
from train_throughput import COCO_N, V, caption_arrays

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"train": "train2017", "val": "val2017"}
TOKEN_SPEC = token_spec()  # the shipped data configs' settings


def write_split(root, name, n, seed):
    lengths, words = caption_arrays(n, seed)
    text = np.array([f"w{i}" for i in range(V)])[words]
    caps = np.split(text, np.cumsum(lengths)[:-1])
    (root / name).mkdir(parents=True, exist_ok=True)
    data = {"images": [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg"} for i in range(n)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "caption": " ".join(c)} for i, c in enumerate(caps)]}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"captions_{name}.json").write_text(json.dumps(data))
    return words, lengths


def synthetic_coco(folder, n_train, n_val):
    """COCO layout + the token and feature caches that captioner.run would otherwise build with spaCy and a CNN."""
    root, cache = folder / "coco", folder / "cache"
    drawn = {"train": write_split(root, "train2017", n_train, 0), "val": write_split(root, "val2017", n_val, 1)}
    splits = load_splits(root, SPLITS)

    def tokens(tmp):  # the layout of captioner.data.vocab.build_tokens: words by training frequency, ties alphabetical
        counts = np.bincount(drawn["train"][0], minlength=V)
        order = sorted(range(V), key=lambda i: (-counts[i], f"w{i}"))
        rank = np.empty(V, dtype=np.int32)
        rank[order] = np.arange(V)
        for role, (words, lengths) in drawn.items():
            n = len(lengths)
            np.save(tmp / f"{role}.tokens.npy", rank[words])
            np.save(tmp / f"{role}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
            np.save(tmp / f"{role}.img_caps.npy", np.arange(n + 1, dtype=np.int64))
            np.save(tmp / f"{role}.image_ids.npy", np.arange(1, n + 1, dtype=np.int64))
        meta = dict(TOKEN_SPEC, n_train_words=V, counts=[int(counts[i]) for i in order])
        (tmp / "words.json").write_text(json.dumps({"words": [f"w{i}" for i in order], **meta}))

    cached_dir(token_dir(cache, splits, TOKEN_SPEC), tokens, marker="words.json")
    spec = preprocess_spec(OmegaConf.load(REPO / "conf" / "encoder" / "resnet50.yaml"))
    for role, split in splits.items():
        def features(tmp, split=split, seed=len(role)):
            g = np.random.default_rng(seed)
            out = np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float16, (len(split.image_ids), 2048))
            for s in range(0, len(out), 8192):
                out[s:s + 8192] = g.standard_normal((min(8192, len(out) - s), 2048), dtype=np.float32)
            out.flush()
            np.save(tmp / "image_ids.npy", np.asarray(split.image_ids, dtype=np.int64))
            (tmp / "meta.json").write_text(json.dumps(dict(spec, synthetic=True, n_images=len(split.image_ids))))
        cached_dir(feature_dir(cache, split, spec), features, marker="meta.json")
    return root


def events(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def rates(run_dir):
    """(steps/s within epochs after the first, epochs/s between the last two validations)."""
    train, val = events(run_dir, "train/loss"), events(run_dir, "val/loss")
    bounds = [s for s, _ in val]
    steps = seconds = 0.0
    for (s1, t1), (s2, t2) in zip(train, train[1:]):
        # a validation logged at step b ran after the training step b was logged: (s1, s2] spans it if s1 <= b < s2
        if bounds and s1 >= bounds[0] and not any(s1 <= b < s2 for b in bounds):
            steps, seconds = steps + s2 - s1, seconds + t2 - t1
    epoch_s, epoch_steps = (val[-1][1] - val[-2][1], val[-1][0] - val[-2][0]) if len(val) >= 2 else (float("nan"), 0)
    return (steps / seconds if seconds else float("nan")), epoch_s, epoch_steps


def run(overrides, run_dir, env=None):
    cmd = [sys.executable, "-m", "captioner.run", *overrides, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"captioner.run failed:\n{out.stderr[-3000:]}")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scale", default="small", choices=["small", "coco"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--captions", type=int, default=None, help="training captions (default: by --scale)")
    p.add_argument("--shapes", action="store_true", help="experiment=shapes embeddings=learned, steps/s")
    p.add_argument("--bench-cps", type=float, default=None, help="train_throughput.py's captions/s, if known")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    trainer = "trainer=gpu" if cuda else "trainer=cpu"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.shapes:
            data_dir = os.environ.get("CAPTIONER_DATA_DIR", str(tmp / "data"))
            overrides = ["experiment=shapes", "embeddings=learned", "eval_every=0", trainer,
                         f"paths.data_dir={data_dir}", *a.overrides]
            run(overrides, tmp / "run")
            steps_per_s, epoch_s, epoch_steps = rates(tmp / "run")
            result.update(run="captioner.run " + " ".join(overrides[:4]), steps_per_s=round(steps_per_s, 1),
                          epoch_s=round(epoch_s, 3), epoch_steps_per_s=round(epoch_steps / epoch_s, 1))
            print(json.dumps(result))
            return
        n = a.captions or (COCO_N if a.scale == "coco" else 4096)
        root = synthetic_coco(tmp, n, 2048 if a.scale == "coco" else 256)
        overrides = ["data=coco", f"data.root={root}", f"paths.data_dir={tmp}", "encoder=resnet50",
                     "embeddings=learned", "embeddings.dim=300", "hidden_size=512", "batch_size=256",
                     "vocab_size=10000", f"epochs={a.epochs}", "eval_every=0", trainer, *a.overrides]
        run(overrides, tmp / "run")
        steps_per_s, epoch_s, _ = rates(tmp / "run")
        bench = a.bench_cps
        if bench is None:
            compile = [o.split("=", 1)[1] for o in a.overrides if o.startswith("compile=")][-1:]  # the same step
            out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--scale",
                                  a.scale, "--no-reference", *(["--compile", *compile] if compile else [])],
                                 capture_output=True, text=True, check=True)
            bench = json.loads(out.stdout.strip().splitlines()[-1])["captions_per_s"]
        cps = steps_per_s * 256
        result.update(scale=a.scale, captions=n, overrides=a.overrides, captions_per_s=round(cps, 1),
                      epoch_captions_per_s=round(n / epoch_s, 1), benchmark_captions_per_s=bench,
                      ratio=round(cps / bench, 3), epoch_ratio=round(n / epoch_s / bench, 3),
                      steps_per_epoch=math.ceil(n / 256))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
