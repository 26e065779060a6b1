"""Training throughput of the real captioner (CaptionModule + CaptionBatches through the Lightning Trainer)
against ../shared/bench/ref_limits.py's tuned plain-PyTorch loop, run in the same process session.

Synthetic COCO-scale workload, the reference's sizes: features 2048 (float16, memory-mapped from disk),
COCO-like caption lengths, vocabulary 10,000, embedding 300, LSTM 512, batch 256.

    python benchmarks/train_throughput.py                 # CPU: 4,096 captions (the reference's small scale)
    python benchmarks/train_throughput.py --scale coco    # 118,287 captions (GPU)
    python benchmarks/train_throughput.py --scale coco --max-steps 60   # peak host memory at COCO scale (CPU)
    python benchmarks/train_throughput.py --scale coco --compile graphs   # the opt-in CUDA-graphed step
    python benchmarks/train_throughput.py --scale coco --compile reduce-overhead   # the opt-in compiled loss
    python benchmarks/train_throughput.py --bare          # also the same module and batches in a plain loop
    python benchmarks/train_throughput.py --scale coco --model show_attend_tell   # an attention model's epoch

--model show_attend_tell or transformer (their conf/model defaults) trains on 7 x 7 grids of 2048-d vectors, one grid
per 5 captions (COCO's images), a ResNet-50's map; they have no reference loop, so epoch_s is their figure, to set
beside Show and Tell's on the same machine.

The reference is ../shared/bench/ref_limits.py, or `--ref PATH` / $CAPTIONER_REF (benchmarks/reference.py).

Last line: JSON with captions_per_s, reference_captions_per_s, ratio, epoch_s (118,287 captions), and
peak_rss_mb: the peak resident memory while training (Linux VmHWM, reset after the data is generated). With
`--bare`: bare_captions_per_s, the same CaptionModule.loss, batches and optimizer in a plain loop without the
Trainer, and trainer_share, the fraction of the bare loop's speed that the Trainer keeps (what Lightning costs).
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from captioner.data.datamodule import CaptionBatches, CaptionDataModule
from captioner.training.module import CaptionModule
from captioner.data.vocab import SPECIALS
from reference import reference_path, run_reference

COCO_N, FEAT, EMB, HID, V, BS = 118_287, 2048, 300, 512, 10_000, 256
GRID, PER_IMAGE = 49, 5  # attention models: a 7 x 7 grid per image, 5 captions per image as in COCO


def caption_arrays(n, seed=0, g=None):
    """Words per caption (COCO-like, as ref_limits.py draws them, less the <end> it counts) and the word ids.

    ref_limits.py draws its words from the same Zipf law over ids 0..V-1, but id 0 (the most frequent word, 10% of
    the draws) is also its padding id, so its loss never scores those positions: it trains on 89.8% of its caption
    tokens. Word 0 is left out here, so that both loops score the same number of tokens per caption."""
    g = g or torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=g) * 2.5 + 11.5).round().clamp(6, 30).long().numpy() - 1  # + <end>
    zipf = 1.0 / torch.arange(1, V + 1).float()
    words = torch.multinomial(zipf / zipf.sum(), int(lengths.sum()), replacement=True, generator=g).numpy()
    caption = np.repeat(np.arange(n), lengths)
    keep = words != 0
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep[first] |= np.bincount(caption[keep], minlength=n) == 0  # a caption of only word 0 keeps one (no empty one)
    return np.bincount(caption[keep], minlength=n), words[keep]


def synthetic(n, folder, seed=0, grid=False):
    """Features memory-mapped from disk and token arrays with COCO-like lengths (as ref_limits.py draws them).
    `grid`: a [GRID, FEAT] map per image, each shared by PER_IMAGE consecutive captions."""
    g = torch.Generator().manual_seed(seed)
    lengths, words = caption_arrays(n, g=g)
    path = Path(folder) / "features.npy"
    rows, shape = (-(-n // PER_IMAGE), (GRID, FEAT)) if grid else (n, (FEAT,))
    feats = np.lib.format.open_memmap(path, "w+", np.float16, (rows, *shape))
    chunk = 8192 // (GRID if grid else 1)
    for s in range(0, rows, chunk):
        feats[s:s + chunk] = torch.randn(min(chunk, rows - s), *shape, generator=g).numpy()
    feats.flush()
    del feats
    feats = np.load(path, mmap_mode="r")
    ones = np.ones(n, dtype=np.int64)
    feat_rows = np.arange(n) // PER_IMAGE if grid else np.arange(n)
    return CaptionBatches(feats, feat_rows, (words + len(SPECIALS)).astype(np.int64),
                          np.concatenate([[0], np.cumsum(lengths)]), np.arange(n), ones)


class EpochTimer(Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        float(trainer.callback_metrics.get("train/loss", torch.zeros(())))  # waits for the GPU
        self.times.append(time.perf_counter() - self.start)


def make_module(compile=False, model="show_and_tell"):
    """Show and Tell as the reference's (LSTM 512); another model with its conf/model/ defaults."""
    args = {"hidden_size": HID, "rnn_type": "lstm"} if model == "show_and_tell" else {"model": {"name": model}}
    return CaptionModule(SPECIALS + [f"w{i}" for i in range(V)], FEAT, preprocess={},
                         embeddings={"name": "learned", "dim": EMB}, learning_rate=1e-4, compile=compile, **args)


def run_captioner(ds, epochs, max_steps, compile=False, model="show_and_tell"):
    dm = CaptionDataModule(datasets={"train": ds, "val": ds}, batch_size=BS, shuffle=True,
                           pad_to=8 if compile else 1, pad_real=compile == "graphs")
    module = make_module(compile, model)
    cuda = torch.cuda.is_available()
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator="auto", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         max_epochs=epochs, max_steps=max_steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=50, callbacks=[timer])
    reset_peak_rss()  # measure training, not the generation of the synthetic data
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - start
    # the first epoch warms up (allocator, cuDNN plans); the rest are timed
    timed = timer.times[1:] or timer.times
    cps = len(ds) * len(timed) / sum(timed) if max_steps < 0 else max_steps * BS / total
    return cps


def bare_loop(ds, model="show_and_tell"):
    """The batches (assembled on the device on a GPU) and a step function of the same loss and optimizer as the
    Trainer run's, for a plain loop: step(batch) -> loss."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and ds.device_ids is None:
        ds.to_device(device)  # as CaptionDataModule places resident features (the Trainer run did it already)
    loader = CaptionDataModule(datasets={"train": ds}, batch_size=BS, shuffle=True)._loader("train", True)
    module = make_module(model=model).to(device)
    opt = module.configure_optimizers()["optimizer"]  # the Trainer run's: AMSGrad Adam, fused on a GPU

    def step(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss = module.loss(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return loader, step


def run_bare(ds, epochs, model="show_and_tell"):
    """The same loss, batches and optimizer as run_captioner, in a plain loop."""
    loader, step = bare_loop(ds, model)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            loss = step(batch)
        float(loss.detach())  # waits for the GPU
        times.append(time.perf_counter() - start)
    timed = times[1:] or times  # the first epoch warms up, as in run_captioner
    return len(ds) * len(timed) / sum(timed)


def compile_setting(text: str):
    """--compile's text as the module's setting: false, true, or a name (graphs, reduce-overhead, ...)."""
    return {"false": False, "true": True}.get(text.lower(), text)


def reset_peak_rss():
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scale", default="small", choices=["small", "coco"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=-1, help="stop early (peak-memory runs at COCO scale)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--ref", default=None, help="ref_limits.py (default: $CAPTIONER_REF or ../shared/bench/)")
    p.add_argument("--compile", default="false", help="the module's compile setting: false, true, graphs or a "
                                                       "torch.compile mode")
    p.add_argument("--bare", action="store_true", help="also time the same step in a plain loop (no Trainer)")
    p.add_argument("--model", default="show_and_tell", choices=["show_and_tell", "show_attend_tell", "transformer"])
    a = p.parse_args()
    compile = compile_setting(a.compile)
    n = COCO_N if a.scale == "coco" else 4_096
    epochs = a.epochs or (4 if torch.cuda.is_available() else 2)
    with tempfile.TemporaryDirectory() as folder:
        ds = synthetic(n, folder, grid=a.model != "show_and_tell")
        cps = run_captioner(ds, epochs, a.max_steps, compile, a.model)
        peak = peak_rss_mb()
        bare = run_bare(ds, epochs, a.model) if a.bare else None
    skip = a.no_reference or a.model != "show_and_tell"  # the reference loop is Show and Tell's
    ref = None if skip else run_reference(reference_path(a.ref), "--scale", a.scale,
                                          "--skip", "seed,beam,extract,decode")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "model": a.model, "scale": a.scale, "captions": n, "compile": compile,
              "captions_per_s": round(cps, 1), "epoch_s": round(COCO_N / cps, 2), "peak_rss_mb": round(peak)}
    if bare:
        result.update(bare_captions_per_s=round(bare, 1), trainer_share=round(cps / bare, 3))
    if ref:
        result["reference_captions_per_s"] = ref["fast_captions_per_s"]
        result["ratio"] = round(cps / ref["fast_captions_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
