"""The three models on Flickr8k at the same budget: show_and_tell, show_attend_tell and transformer, each trained with
experiment=flickr8k for `--epochs` epochs, then `val` captioned with beam 3 and scored (captioner.evaluate, in
this process). One JSON line per model: BLEU-1..4, METEOR, ROUGE-L, CIDEr, training minutes, parameters, device.

    python benchmarks/models.py --root ../shared/datasets/flickr8k --epochs 10 [key=value ...]
    python benchmarks/models.py --limit-train 2 --limit-val 20 --epochs 1    # a minutes-long check of the script

Overrides go to every training (e.g. `trainer=gpu`); `--models` picks a subset. --limit-train N trains on N batches
an epoch (Lightning's limit_train_batches) and --limit-val N evaluates the first N val images: a cheap end-to-end
check, not a benchmark.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
MODELS = ("show_and_tell", "show_attend_tell", "transformer")


def compose(name, overrides):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("captioner.conf", version_base="1.3"):
        return hydra_compose(name, overrides=overrides)


def train(run_dir, overrides) -> tuple:
    """-> (minutes extracting features, minutes training): the features (pooled or grid, as the model takes) are
    built or found first, so the training minutes are the same kind of figure for every model."""
    from captioner.models import feature_kind
    from captioner.run import train as run_train
    from captioner.training.prepare import prepare

    cfg = compose("config", [f"paths.run_dir={run_dir}", "trainer.enable_model_summary=false", *overrides])
    start = time.perf_counter()
    prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir, kind=feature_kind(cfg.model.name))
    features = time.perf_counter()
    run_train(cfg)
    return (features - start) / 60, (time.perf_counter() - features) / 60


def evaluate(ckpt, data_dir, root, max_images):
    from captioner.evaluate import compose_evaluate, evaluate_checkpoint

    limit = [] if max_images is None else [f"max_images={max_images}"]
    cfg, checkpoint = compose_evaluate([f"ckpt_path={ckpt}", f"paths.data_dir={data_dir}", f"data.root={root}",
                                        "split=val", "spice=false", "beam_size=3", *limit])
    metrics, report, _ = evaluate_checkpoint(cfg, checkpoint)
    return metrics, report


def parameters(ckpt) -> int:
    from captioner.checkpoint import load_checkpoint
    from captioner.models import load_model

    return sum(p.numel() for p in load_model(load_checkpoint(ckpt), ckpt).parameters())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="../shared/datasets/flickr8k", help="the folder holding images/ and "
                   "dataset_flickr8k.json")
    p.add_argument("--data-dir", default="data", help="where caches live (paths.data_dir)")
    p.add_argument("--work", default="outputs/benchmarks/models", help="where the run folders go")
    p.add_argument("--epochs", type=int, default=10, help="every model's budget")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--limit-train", type=int, default=None, help="training batches per epoch (a quick check)")
    p.add_argument("--limit-val", type=int, default=None, help="val images evaluated (a quick check)")
    a, user = p.parse_known_args()
    root, work = Path(a.root).resolve() / "images", Path(a.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    if not (root.parent / "dataset_flickr8k.json").is_file():
        sys.exit(f"error: no Flickr8k at {root.parent} (expected images/ and dataset_flickr8k.json); pass --root.")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    common = ["experiment=flickr8k", f"data.root={root}", f"paths.data_dir={a.data_dir}", f"epochs={a.epochs}"]
    if a.limit_train:
        common.append(f"+trainer.limit_train_batches={a.limit_train}")
    if a.limit_val:  # validation captions during training: as few as evaluated
        common += [f"+trainer.limit_val_batches={a.limit_val}", f"eval_max_images={a.limit_val}"]
    for name in a.models.split(","):
        run_dir = work / name
        extract, minutes = train(run_dir, [*common, f"model={name}", *user])
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        metrics, report = evaluate(ckpt, a.data_dir, root, a.limit_val)
        print(json.dumps({"model": name, **{m: round(metrics[m], 4) for m in METRICS},
                          "minutes_train": round(minutes, 2), "minutes_features": round(extract, 2), "parameters": parameters(ckpt), "device": device,
                          "epochs": a.epochs, "val_images": report.get("images"), "decode": report.get("decode")}),
              flush=True)
    print(f"runs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
