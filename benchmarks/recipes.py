"""Training recipes on data=scenes: cross-entropy (XE), XE with the best regularisers/schedule, SCST (mean baseline)
started from the XE checkpoint, and the blind (image-features-zeroed) baseline; val CIDEr of each.

    python benchmarks/recipes.py [key=value ...]       # the four stages (overrides go to every stage)
    python benchmarks/recipes.py --seeds 5             # XE, XE tuned and SCST as means over seeds 0..4
    python benchmarks/recipes.py --caption-choice      # fixed (caption_idx=0) vs random (caption_idx=-1) caption
    python benchmarks/recipes.py --step-timing [--batch 256] [--device cuda] [--precision 32]   # SCST vs XE step

The step timing needs no dataset, spaCy, pycocoevalcap or CNN: random features and synthetic references.
Last line: JSON with the figures.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

COMMON = ["embeddings=glove50", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "logger=none"]
XE = ["experiment=scenes_xe"]  # conf/experiment/scenes_xe.yaml: 3,000 + 300 images, LSTM 256, 20 epochs
# the best of a search over dropout, label smoothing, clipping, weight decay and schedules, by the mean val CIDEr
# of 5 seeds (docs/benchmarks.md: at this budget none beats plain XE beyond the seed-to-seed spread)
TUNED = ["label_smoothing=0.1"]
SCST = ["experiment=scenes_scst"]  # 3 epochs of SCST, 5 samples per image, mean baseline


def stage(work, name, overrides, data_dir):
    from hydra import compose, initialize_config_module

    from captioner.run import train

    with initialize_config_module("captioner.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.data_dir={data_dir}", f"paths.run_dir={work / name}",
                                           *COMMON, *overrides])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    metrics = json.loads((work / name / "metrics.json").read_text())
    print(f"{name}: val/CIDEr {metrics.get('val/CIDEr', float('nan')):.4f} in {seconds:.0f} s", file=sys.stderr)
    return metrics.get("val/CIDEr", float("nan")), round(seconds, 1), work / name / "checkpoints" / "last.ckpt"


def quality(a, user):
    with tempfile.TemporaryDirectory() as tmp:
        work, out = Path(tmp), {}
        if a.caption_choice:
            for name, idx in (("fixed", 0), ("random", -1)):
                cider, s, _ = stage(work, name, [*XE, *user, f"caption_idx={idx}"], a.data_dir)
                out.update({f"val_cider_{name}": round(cider, 4), f"seconds_{name}": s})
            return out

        def seeded(name, overrides):  # the mean over seeds 0..N-1, and each seed's value when N > 1
            runs = [stage(work, f"{name}_seed{seed}", [*overrides, *user, f"seed={seed}"], a.data_dir)
                    for seed in range(a.seeds)]
            out[f"val_cider_{name}"] = round(sum(r[0] for r in runs) / a.seeds, 4)
            out[f"seconds_{name}"] = round(sum(r[1] for r in runs), 1)
            if a.seeds > 1:
                out[f"val_cider_{name}_per_seed"] = [round(r[0], 4) for r in runs]
            return runs

        start, _, xe_ckpt = seeded("xe", XE)[0]  # SCST starts from the XE run of seed 0
        seeded("xe_tuned", [*XE, *TUNED])
        out["val_cider_scst_start"] = round(start, 4)
        seeded("scst", [*SCST, f"init_from={xe_ckpt}"])
        cider, s, _ = stage(work, "blind", [*XE, "blind=true", *user], a.data_dir)
        out.update(val_cider_blind=round(cider, 4), seconds_blind=s)
        out["scst_gain_relative"] = round(out["val_cider_scst"] / out["val_cider_scst_start"] - 1, 4)
        return out


WAITS = {"aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select",
         "aten::_local_scalar_dense"}  # ops whose result size or value the host must wait for on a GPU


def dispatched_ops(step):
    """aten ops of one loss and backward (a proxy of GPU kernel launches) and those among them that wait."""
    from torch.profiler import profile

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    return sum(e.count for e in ops), sum(e.count for e in ops if e.key in WAITS)


def step_timing(batch, device, repeats=20, precision="32", vocab=10000, feature_dim=1280, hidden=512, refs=5,
                length=16, compile=False):
    """Seconds per optimizer step, XE vs SCST (5 samples, mean baseline), on random data of COCO-like sizes, both
    at the same precision ("bf16-mixed": under bf16 autocast, as `trainer=gpu` trains). With `compile`, SCST's
    sampler and reward are compiled and its ratio is to the faster of the compiled and the eager XE step."""
    from functools import partial

    from captioner.training import scst
    from captioner.training.module import CaptionModule
    from captioner.training.scst import SCSTModule
    from captioner.data.vocab import PAD

    g = torch.Generator().manual_seed(0)
    words = lambda *shape: torch.randint(4, vocab, shape, generator=g)
    references = words(batch * 4, refs, length)
    references[:, :, 12:] = PAD  # 12-word references
    kwargs = dict(itos=["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)],
                  feature_dim=feature_dim, preprocess={}, embeddings={"dim": 300}, hidden_size=hidden,
                  config={"scst": {"samples": 5, "baseline": "mean", "max_len": length}})
    features = torch.randn(batch, feature_dim, generator=g).to(device)
    inputs = torch.cat([torch.ones(batch, 1, dtype=torch.long), words(batch, length - 1)], 1)
    targets = torch.cat([inputs[:, 1:], torch.full((batch, 1), 2)], 1).to(device)  # <end> last
    inputs = inputs.to(device)
    rows = torch.arange(batch, device=device)
    real = torch.arange(batch * length, device=device)  # every target is a word or <end>: no pads
    out = {}
    stages = [("xe", CaptionModule, compile)] + ([("xe_eager", CaptionModule, False)] if compile else [])
    for name, cls, compiled in stages + [("scst", SCSTModule, compile)]:  # SCST last: its ops are counted below
        torch.manual_seed(0)
        module = cls(**{**kwargs, "compile": compiled}).to(device)
        opt = torch.optim.Adam(module.parameters(), 1e-4)
        if name == "scst":
            module.prepare(references)
            module.log = lambda *a, **k: None  # no Trainer here
        batch_ = (features, inputs, targets, real, rows)  # as the trainer's batches (SCST's carry their rows)
        loss_of = lambda: (module.training_step(batch_, 0) if name == "scst" else
                           module.compiled_loss(batch_[:3])[0] if compiled else module.loss(batch_[:4])[0])

        def step(optimize=True):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = loss_of()
            loss.backward()
            if optimize:
                opt.step()

        for i in range(repeats + 3):  # 3 warm-up steps (and compilation)
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_step_ms"] = round(1000 * (time.perf_counter() - start) / repeats, 2)
    # what one SCST step dispatches in its GPU form (the re-scoring scores every position, no boolean indexing),
    # whatever the device: a proxy, on a CPU, of its kernel launches and host waits on a GPU
    # (the timed step under its autocast, since a compiled graph called outside it would be compiled again)
    rescore = scst.caption_nll
    scst.caption_nll = partial(rescore, real_only=False)
    try:
        out["scst_aten_ops"], out["scst_gpu_waits"] = dispatched_ops(lambda: step(optimize=False))
    except RuntimeError as e:  # the profiler around CUDA graphs: keep the timings above
        out["scst_ops_error"] = str(e).splitlines()[0][:200]
    scst.caption_nll = rescore
    # against the faster XE step: compiling the XE loss can cost more than it saves
    xe = min(out["xe_step_ms"], out.get("xe_eager_step_ms", float("inf")))
    out.update(ratio=round(out["scst_step_ms"] / xe, 2), batch=batch, precision=precision,
               compile=compile,
               device=str(device),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--step-timing", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"],
                   help="of both steps; default: bf16-mixed on a GPU (as trainer=gpu), 32 on a CPU")
    p.add_argument("--compile", default=False, help="step timing with compile=true or a torch.compile mode "
                   "(reduce-overhead: CUDA graphs)")
    p.add_argument("--sizes", default="10000,1280,512",
                   help="step timing: vocabulary, feature and hidden sizes (tiny ones leave only the per-op cost)")
    p.add_argument("--caption-choice", action="store_true", help="compare caption_idx=0 with caption_idx=-1")
    p.add_argument("--seeds", type=int, default=1,
                   help="XE, XE tuned and SCST (all from seed 0's XE checkpoint): the mean over seeds 0..N-1")
    p.add_argument("--data-dir", default="data", help="where datasets and caches live (paths.data_dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; on a shared 2-core machine 2 threads made these small steps 20x slower")
    a, user = p.parse_known_args()
    torch.set_num_threads(a.threads)
    if a.step_timing:
        precision = a.precision or ("bf16-mixed" if a.device.startswith("cuda") else "32")
        vocab, feature_dim, hidden = map(int, a.sizes.split(","))
        compile = {"true": True, "false": False}.get(str(a.compile).lower(), a.compile)
        print(json.dumps(step_timing(a.batch, torch.device(a.device), a.repeats, precision, vocab, feature_dim,
                                     hidden, compile=compile)))
        return
    print(json.dumps(quality(a, user)))


if __name__ == "__main__":
    main()
