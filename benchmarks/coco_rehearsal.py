"""Full-scale rehearsal: a synthetic dataset with COCO's exact size and layout, then the real commands on it.

    python benchmarks/coco_rehearsal.py --stage prepare        # here (spaCy): annotations + token cache, no images
    python benchmarks/coco_rehearsal.py                        # there (GPU): images, extract, run, evaluate
    python benchmarks/coco_rehearsal.py --scale 0.01 --encoder resnet18 --image-size 64 --hidden-size 64   # CPU, CI

Builds under --root 123,287 JPEGs in train2017/ + val2017/ (118,287 + 5,000), five captions each in
annotations/captions_*2017.json, and caption_datasets/dataset_coco.json (113,287 train+restval / 5,000 val / 5,000
test, naming the photos by their 2014 names, as Karpathy's file does). Images are 320x240 (COCO's ~640x480 cost ~4x
more to decode); captions are 8-13 words, Zipf over 12,000 made-up words. A seeded generator makes the JSON files
byte-identical everywhere, so the content-keyed token cache that `--stage prepare` builds with spaCy (in
--cache-dir, carried along) is valid where spaCy is missing. Then `captioner.extract`, `captioner.run
experiment=show_and_tell` (1 epoch) and `captioner.evaluate split=test` run as subprocesses, the encoder with random
weights from a local state dict. Last line: one JSON object with seconds and images/s per stage, peak host RSS and
peak GPU memory (nvidia-smi).
"""
import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
COCO = {"train2017": 118_287, "val2017": 5_000}
KARPATHY = {"test": 5_000, "val": 5_000, "restval": 30_504, "train": 82_783}
SIZE = (320, 240)


def sizes(scale):
    n17 = {k: max(2, round(v * scale)) for k, v in COCO.items()}
    kp = {k: max(2, round(KARPATHY[k] * scale)) for k in ("test", "val", "restval")}
    kp["train"] = sum(n17.values()) - sum(kp.values())
    return n17, kp


def make_annotations(root: Path, scale: float, seed=0):
    """The two COCO caption files and dataset_coco.json; deterministic in (scale, seed) down to the byte."""
    rng = random.Random(seed)
    n17, kp = sizes(scale)
    total = sum(n17.values())
    ids = sorted(rng.sample(range(1, 600_000), total))
    val17 = set(rng.sample(ids, n17["val2017"]))
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(20_000)})[:12_000]
    rng.shuffle(words)
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(words))))  # Zipf
    captions = {i: [" ".join(rng.choices(words, cum_weights=cum, k=rng.randint(8, 13))).capitalize() + "."
                    for _ in range(5)] for i in ids}
    order = ids[:]
    rng.shuffle(order)
    karpathy, start = {}, 0
    for split, n in kp.items():
        karpathy.update({i: split for i in order[start:start + n]})
        start += n
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in COCO:
        imgs = [i for i in ids if (i in val17) == (split == "val2017")]
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": SIZE[0], "height": SIZE[1]} for i in imgs]
        anns = [{"id": i * 10 + k, "image_id": i, "caption": c} for i in imgs for k, c in enumerate(captions[i])]
        text = json.dumps({"images": images, "annotations": anns})
        (root / "annotations" / f"captions_{split}.json").write_text(text)
    entries = []
    for n, i in enumerate(ids):
        old = "train2014" if karpathy[i] == "train" else "val2014"
        sentences = [{"raw": c, "tokens": c.lower().rstrip(".").split()} for c in captions[i]]
        entries.append({"filepath": old, "filename": f"COCO_{old}_{i:012d}.jpg", "imgid": n, "split": karpathy[i],
                        "sentences": sentences, "cocoid": i})
    (root / "caption_datasets").mkdir(exist_ok=True)
    (root / "caption_datasets" / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return {i: ("val2017" if i in val17 else "train2017") for i in ids}


def _draw(job):
    from PIL import Image, ImageDraw

    folder, ids = job
    for i in ids:
        path = Path(folder) / f"{i:012d}.jpg"
        if path.exists():
            continue
        r = random.Random(i)
        im = Image.new("RGB", SIZE, tuple(r.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = r.randrange(SIZE[0]), r.randrange(SIZE[1])
            box = [x, y, x + r.randrange(20, 160), y + r.randrange(20, 120)]
            (draw.ellipse if r.random() < 0.5 else draw.rectangle)(box, fill=tuple(r.randrange(256) for _ in range(3)))
        tmp = path.with_name(f".{path.name}.tmp")
        im.save(tmp, "JPEG", quality=85)
        os.replace(tmp, path)
    return len(ids)


def make_images(root: Path, where: dict, workers: int):
    jobs = []
    for split in COCO:
        (root / split).mkdir(parents=True, exist_ok=True)
        ids = [i for i, s in where.items() if s == split]
        jobs += [(str(root / split), ids[k:k + 500]) for k in range(0, len(ids), 500)]
    with Pool(workers) as pool, tqdm(total=len(where), desc="images", unit="img", mininterval=2) as bar:
        for n in pool.imap_unordered(_draw, jobs):
            bar.update(n)
    return len(where)


class GpuMemory(threading.Thread):
    """Peak of nvidia-smi's memory.used (MiB) while a stage runs; None without nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = None, threading.Event()

    def run(self):
        while not self.done.wait(0.25):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak or 0, max(int(x) for x in out.split()))
            except (OSError, ValueError, subprocess.SubprocessError):
                return


def stage(name, args, out: Path, timeout):
    """Run `python -m args...`; -> (seconds, peak RSS MiB of its main process, peak GPU MiB, stdout)."""
    log = out / f"{name}.log"
    print(f"[rehearsal] {name}: python -m {' '.join(args)}", file=sys.stderr, flush=True)
    gpu = GpuMemory()
    gpu.start()
    start = time.perf_counter()
    with open(log, "w") as err, open(out / f"{name}.out", "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=stdout, stderr=err, cwd=out)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    gpu.done.set()
    gpu.join()
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        tail = log.read_text()[-2000:]
        sys.exit(f"[rehearsal] {name} failed (status {status}, {seconds:.0f} s); log {log}:\n{tail}")
    return seconds, usage.ru_maxrss / 1024, gpu.peak, (out / f"{name}.out").read_text()


def overrides(a, root, weights):
    import torch

    return ["experiment=show_and_tell", f"data.root={root}", f"paths.cache_dir={a.cache_dir.resolve()}",
            f"encoder={a.encoder}", f"encoder.weights={weights}", f"encoder.num_workers={a.workers}",
            f"encoder.batch_size={a.extract_batch}", f"data.image_size={a.image_size}", "embeddings=learned",
            f"hidden_size={a.hidden_size}", "trainer=" + ("gpu" if torch.cuda.is_available() else "cpu")]


def token_cache(root, argv):
    """Build (here, with spaCy) or find (there) the token cache that captioner.run will look for."""
    from captioner.cli import compose_config
    from captioner.data.coco import load_splits
    from captioner.data.vocab import build_tokens, token_dir, token_spec

    cfg = compose_config("config", ["paths.run_dir=.", *argv])
    splits = load_splits(root, cfg.data.splits, cfg.data.split_file, find_images=False)
    spec = token_spec(cfg.data.lowercase, cfg.data.drop_punct, max_words=cfg.data.max_words)
    folder = token_dir(cfg.paths.cache_dir, splits, spec)
    if not (folder / "words.json").exists():
        try:
            import spacy  # noqa: F401
        except ImportError:
            sys.exit(f"[rehearsal] the token cache {folder} is missing and spaCy is not installed: run "
                     f"`--stage prepare` (same --scale) where spaCy is, and bring its --cache-dir along.")
        build_tokens(splits, cfg.paths.cache_dir, cfg.data.lowercase, cfg.data.drop_punct,
                     max_words=cfg.data.max_words)
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="1: COCO's size; 0.01: 1/100 (CI on a CPU)")
    p.add_argument("--stage", choices=["prepare", "all"], default="all")
    p.add_argument("--root", type=Path, default=Path("/tmp/coco-rehearsal"), help="the dataset (local disk)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "rehearsal-cache")
    p.add_argument("--out", type=Path, default=None, help="logs and run dir (default: <root>/out)")
    p.add_argument("--encoder", default="resnet50", help="a torchvision ResNet (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="extraction workers")
    p.add_argument("--extract-batch", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--timeout", type=int, default=600, help="seconds per command")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    root, out = a.root.resolve(), (a.out or a.root / "out").resolve()
    figures = {"scale": a.scale, "generated_image_size": "x".join(map(str, SIZE)), "encoder": a.encoder,
               "encoder_image_size": a.image_size, "stages": {}}
    start = time.perf_counter()
    where = make_annotations(root, a.scale)
    figures["stages"]["annotations"] = {"seconds": round(time.perf_counter() - start, 1)}
    weights = root / "weights" / f"{a.encoder}-random.pth"
    argv, start = overrides(a, root, weights), time.perf_counter()
    tokens = token_cache(root, argv)
    figures["stages"]["tokens"] = {"seconds": round(time.perf_counter() - start, 1), "folder": str(tokens)}
    if a.stage == "prepare":
        print(json.dumps(figures))
        return
    import torch
    import torchvision

    torch.manual_seed(0)
    (root / "weights").mkdir(exist_ok=True)
    torch.save(getattr(torchvision.models, a.encoder)(weights=None).state_dict(), weights)
    start = time.perf_counter()
    figures["images"] = n = make_images(root, where, os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    figures["stages"]["images"] = {"seconds": round(seconds, 1), "images_per_s": round(n / seconds)}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    peaks = {}

    def record(name, result, **extra):
        seconds, rss, gpu, stdout = result
        peaks[name] = (rss, gpu)
        figures["stages"][name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(rss), "peak_gpu_mib": gpu,
                                   **extra}
        return stdout

    stdout = record("extract", stage("extract", ["captioner.extract", *argv], out, a.timeout))
    metas = [json.loads((Path(line.split("-> ")[1]) / "meta.json").read_text())
             for line in stdout.splitlines() if "-> " in line]
    figures["stages"]["extract"].update(
        images=sum(m["n_images"] + m["skipped"] for m in metas), gpu_decode=all(m["gpu_decode"] for m in metas),
        images_per_s=round(sum(m["n_images"] + m["skipped"] for m in metas) / sum(m["seconds"] for m in metas)))
    record("train", stage("train", ["captioner.run", *argv, "epochs=1", "eval_every=0", f"hydra.run.dir={out}/run",
                                    "trainer.enable_progress_bar=false"], out, a.timeout))
    stamps = [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)) for m in re.finditer(
        r"^\[(\S+ \S+)\]\[\S+\]\[\w+\] - (.*)$", (out / "run" / "run.log").read_text(), re.M)]
    begin = max(t for t, msg in stamps if msg.startswith("Vocabulary:"))
    end = max(t for t, msg in stamps if msg.startswith("Finished:"))
    kp = sizes(a.scale)[1]
    figures["stages"]["train"].update(train_images=kp["train"] + kp["restval"],
                                      fit_seconds=round((end - begin).total_seconds(), 1),
                                      tokenized_here="Tokenized" in (out / "run" / "run.log").read_text())
    record("evaluate", stage("evaluate", [
        "captioner.evaluate", f"ckpt_path={out}/run/checkpoints/last.ckpt", "data=karpathy_coco", f"data.root={root}",
        f"paths.cache_dir={a.cache_dir.resolve()}", "split=test", "beam_size=3", f"batch_size={a.eval_batch}",
        "spice=false", f"output_dir={out}/eval", f"extract.num_workers={a.workers}"], out, a.timeout))
    report = json.loads((out / "eval" / "karpathy_coco-test-last-beam3-len20-nr2-metrics.json").read_text())
    figures["stages"]["evaluate"].update(images=report["images"], **{f"{k}_seconds": v for k, v in
                                                                     report["seconds"].items()},
                                         images_per_s=round(report["images"] / report["seconds"]["decoding"]),
                                         metrics=report["metrics"])
    figures["peak_host_rss_mib"] = round(max(r for r, _ in peaks.values()))
    gpus = [g for _, g in peaks.values() if g is not None]
    figures["peak_gpu_mib"] = max(gpus) if gpus else None
    figures["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
