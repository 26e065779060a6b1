"""The three models on Flickr8k at the same budget: show_and_tell, show_attend_tell and transformer, each trained with
experiment=flickr8k for `--epochs` epochs, then `val` captioned with the default decoding (beam 3) and scored. With
`--scst`, the best of them on val CIDEr goes on with experiment=flickr8k_scst. One JSON line per model (and one for
the SCST stage): BLEU-1..4, METEOR, ROUGE-L, CIDEr, training minutes, parameters, device.

    python benchmarks/models.py --root ../shared/datasets/flickr8k [--scst] [key=value ...]
    python benchmarks/models.py --limit-train 2 --limit-val 20 --epochs 1    # a minutes-long check of the script
    python benchmarks/models.py --scst-from <run>/show_attend_tell/checkpoints/best.ckpt   # SCST from an earlier run

Overrides go to every training (e.g. `trainer=gpu`); `--set MODEL:key=value` to one model's only (e.g.
`--set transformer:learning_rate=5e-4`; its `model.` keys carry on to SCST, the rest do not); `--models` picks a
subset. --limit-train N trains on N batches an epoch (Lightning's limit_train_batches) and --limit-val N evaluates
the first N val images: a cheap end-to-end check, not a benchmark. Training, decoding and scoring are
benchmarks/flickr8k.py's, so the figures are comparable with its.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flickr8k import METRICS, compose, evaluate, train  # benchmarks/flickr8k.py, beside this file

MODELS = ("show_and_tell", "show_attend_tell", "transformer")


def features(overrides) -> float:
    """Build (or find) the features the model takes, pooled or grid -> minutes; so the training minutes that follow
    are the same kind of figure for every model."""
    from captioner.models import feature_kind
    from captioner.training.prepare import prepare

    cfg = compose("config", overrides)
    start = time.perf_counter()
    prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir, kind=feature_kind(cfg.model.name))
    return (time.perf_counter() - start) / 60


def per_model(settings) -> dict:
    """["transformer:learning_rate=5e-4", ...] -> {"transformer": ["learning_rate=5e-4"], ...}"""
    out = {}
    for s in settings:
        name, sep, override = s.partition(":")
        if not sep or name not in MODELS or "=" not in override:
            sys.exit(f"error: --set {s} is not MODEL:key=value with MODEL one of {', '.join(MODELS)}.")
        out.setdefault(name, []).append(override)
    return out


def stage(name, run_dir, overrides, a, root, device, **extra) -> dict:
    """Train one run, then score its best checkpoint on val (`scored`)."""
    minutes = train(run_dir, overrides)
    return scored(run_dir / "checkpoints" / "best.ckpt", a, root, device, name, minutes_train=round(minutes, 2),
                  **extra, overrides=[o for o in overrides if not o.startswith(("data.root", "paths."))])


def scored(ckpt, a, root, device, name=None, **extra) -> dict:
    """Evaluate `ckpt` on val; print and return its JSON line (`name`: by default the checkpoint's model)."""
    from captioner.checkpoint import load_checkpoint
    from captioner.models import load_model, model_entry

    checkpoint = load_checkpoint(ckpt)
    parameters = sum(p.numel() for p in load_model(checkpoint, ckpt).parameters())
    metrics, captions, _, decode = evaluate(ckpt, a.data_dir, root, a.limit_val)
    line = {"model": name or model_entry(checkpoint["hyper_parameters"])["name"],
            **{m: round(metrics[m], 4) for m in METRICS}, **extra, "parameters": parameters, "device": device,
            "val_images": len(captions), "decode": decode, "ckpt": str(ckpt)}
    print(json.dumps(line), flush=True)
    return line


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/flickr8k", help="the folder holding images/ and dataset_flickr8k.json "
                   "(where captioner.download puts them)")
    p.add_argument("--data-dir", default="data", help="where caches live (paths.data_dir)")
    p.add_argument("--work", default="outputs/benchmarks/models", help="where the run folders go")
    p.add_argument("--epochs", type=int, default=10, help="every model's budget")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--set", action="append", default=[], metavar="MODEL:key=value", help="an override for one model")
    p.add_argument("--scst", action="store_true", help="then SCST (experiment=flickr8k_scst) on the best model")
    p.add_argument("--scst-epochs", type=int, default=None, help="SCST's epochs (default: the experiment's, 10)")
    p.add_argument("--scst-from", default=None, metavar="CKPT", help="no cross-entropy training: evaluate this "
                   "checkpoint (best.ckpt of an earlier run of this script), then SCST from it")
    p.add_argument("--limit-train", type=int, default=None, help="training batches per epoch (a quick check)")
    p.add_argument("--limit-val", type=int, default=None, help="val images evaluated (a quick check)")
    a, user = p.parse_known_args()
    root, work = Path(a.root).resolve() / "images", Path(a.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    if not (root.is_dir() and (root.parent / "dataset_flickr8k.json").is_file()):
        sys.exit(f"error: {root.parent} does not hold images/ and dataset_flickr8k.json; run `python -m "
                 f"captioner.download data=flickr8k` first, or pass --root <a copy>.")
    names, extra = a.models.split(","), per_model(a.set)
    if unknown := [n for n in names if n not in MODELS]:
        sys.exit(f"error: --models {','.join(unknown)}: expected some of {', '.join(MODELS)}.")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    common = [f"data.root={root}", f"paths.data_dir={a.data_dir}"]
    if a.limit_train:
        common.append(f"+trainer.limit_train_batches={a.limit_train}")
    if a.limit_val:  # validation captions during training: as few as evaluated
        common += [f"+trainer.limit_val_batches={a.limit_val}", f"eval_max_images={a.limit_val}"]
    lines = []
    if a.scst_from:  # the models were trained by earlier runs (e.g. one process per model, side by side)
        names, a.scst = [], True
        lines.append(scored(Path(a.scst_from).resolve(), a, root, device))
    for name in names:
        overrides = ["experiment=flickr8k", *common, f"epochs={a.epochs}", f"model={name}", *extra.get(name, []),
                     *user]
        minutes = features(overrides)
        lines.append(stage(name, work / name, overrides, a, root, device, epochs=a.epochs,
                           minutes_features=round(minutes, 2)))
    if a.scst:
        best = max(lines, key=lambda line: line["CIDEr"])
        line = stage(f"{best['model']}+scst", work / f"{best['model']}-scst",
                     ["experiment=flickr8k_scst", *common, f"model={best['model']}", f"init_from={best['ckpt']}",
                      *([] if a.scst_epochs is None else [f"epochs={a.scst_epochs}"]),
                      *[o for o in extra.get(best["model"], []) if o.startswith("model.")], *user], a, root, device)
        print(json.dumps({"scst_on": best["model"], "cider_gain": round(line["CIDEr"] / best["CIDEr"] - 1, 4)}))
    print(f"runs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
