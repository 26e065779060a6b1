"""Flickr8k end to end: features (cached), cross-entropy (experiment=flickr8k), SCST (experiment=flickr8k_scst from
the XE run's best checkpoint), then both checkpoints evaluated on all 1,000 val images with the default decoding.

    python -m captioner.download data=flickr8k        # once: data/flickr8k/images and dataset_flickr8k.json
    python benchmarks/flickr8k.py [--root data/flickr8k] [--data-dir data] [key=value ...]

Overrides go to both training stages (e.g. `trainer=gpu`). Each stage runs in this process (Hydra's compose,
captioner.run.train, captioner.evaluate), so the figures are those a user gets from the three commands. Besides
the metrics: minutes per stage, the device, and how many val captions repeat a word pair (a bigram occurring twice).
Last line: JSON with the figures.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
QUIET = ["trainer.enable_model_summary=false"]


def compose(name, overrides):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("captioner.conf", version_base="1.3"):
        return hydra_compose(name, overrides=overrides)


def train(run_dir, overrides):
    from captioner.run import train as run_train

    start = time.perf_counter()
    run_train(compose("config", [f"paths.run_dir={run_dir}", *QUIET, *overrides]))
    return (time.perf_counter() - start) / 60


def evaluate(ckpt, data_dir, root, max_images=None):
    """Every val image (or the first `max_images`) captioned with the default decoding (conf/decode/beam.yaml: beam 3)
    -> (metrics, captions, minutes, the decoding)."""
    from captioner.evaluate import compose_evaluate, evaluate_checkpoint

    start = time.perf_counter()
    limit = [] if max_images is None else [f"max_images={max_images}"]
    cfg, checkpoint = compose_evaluate([f"ckpt_path={ckpt}", f"paths.data_dir={data_dir}", f"data.root={root}",
                                        "split=val", "spice=false", *limit])
    metrics, report, _ = evaluate_checkpoint(cfg, checkpoint)
    captions = [r["caption"] for r in json.loads(Path(report["results"]).read_text())]
    return metrics, captions, (time.perf_counter() - start) / 60, report["decode"]


def repeats_a_pair(caption: str) -> bool:
    words = caption.split()
    pairs = list(zip(words, words[1:]))
    return len(pairs) != len(set(pairs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/flickr8k", help="the folder holding images/ and dataset_flickr8k.json "
                   "(where captioner.download puts them)")
    p.add_argument("--data-dir", default="data", help="where caches live (paths.data_dir)")
    p.add_argument("--work", default="outputs/benchmarks/flickr8k", help="run folders of the two stages")
    a, user = p.parse_known_args()
    root, work = Path(a.root).resolve() / "images", Path(a.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    if not (root.is_dir() and (root.parent / "dataset_flickr8k.json").is_file()):
        sys.exit(f"{root.parent} does not hold images/ and dataset_flickr8k.json; run `python -m captioner.download "
                 f"data=flickr8k` first, or pass --root <a copy>.")
    common = [f"data.root={root}", f"paths.data_dir={a.data_dir}"]
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()}"
           " threads)"}

    from captioner.data.coco import load_splits
    from captioner.training.prepare import prepare

    start = time.perf_counter()  # the features of both splits (extracted once, then cached)
    cfg = compose("config", ["experiment=flickr8k", *common, *user])
    prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir)
    out["minutes_features"] = round((time.perf_counter() - start) / 60, 2)

    out["minutes_xe"] = round(train(work / "xe", ["experiment=flickr8k", *common, *user]), 2)
    xe = work / "xe" / "checkpoints" / "best.ckpt"
    out["minutes_scst"] = round(train(work / "scst", ["experiment=flickr8k_scst", f"init_from={xe}", *common,
                                                      *user]), 2)
    for name, ckpt in (("xe", xe), ("scst", work / "scst" / "checkpoints" / "best.ckpt")):
        metrics, captions, minutes, decode = evaluate(ckpt, a.data_dir, root)
        out.update({f"{name}_{m}": round(metrics[m], 4) for m in METRICS})
        out[f"{name}_val_images"] = len(captions)
        out[f"{name}_repeated_pair_captions"] = sum(map(repeats_a_pair, captions))
        out[f"minutes_eval_{name}"] = round(minutes, 2)
    out["decode"] = decode
    out["scst_cider_gain"] = round(out["scst_CIDEr"] / out["xe_CIDEr"] - 1, 4)
    out["minutes_total"] = round(sum(v for k, v in out.items() if k.startswith("minutes_")), 2)
    split = load_splits(root, {"val": ["val"]}, root.parent / "dataset_flickr8k.json")["val"]
    out["val_images_in_split"] = len(split.image_ids)
    print(f"runs in {work}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
