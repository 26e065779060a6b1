"""Does the image conditioning work? Train on data=shapes and caption its held-out images, next to the same
model trained with the image features zeroed (the blind baseline, `blind=true`).

    python benchmarks/quality.py [key=value ...]          # experiment=shapes + overrides of the training config
    python benchmarks/quality.py --coco-mini ../shared/datasets/coco-mini   # overfit coco-mini train, score it

Last line: JSON with exact_match, blind_exact_match, bleu4, cider (and seconds).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from captioner.data.coco import load_split
from captioner.evaluate import evaluate_split
from captioner.serving.inference import Captioner
from captioner.run import train


def train_and_score(overrides, work, name, split_name):
    with initialize_config_module("captioner.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.run_dir={work / name}", "trainer.enable_progress_bar=false",
                                           "trainer.enable_model_summary=false", "eval_every=0", *overrides])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    split = load_split(cfg.data.root, split_name)
    results, metrics = evaluate_split(Captioner(work / name / "checkpoints" / "last.ckpt"), split, spice=False,
                                      beam_size=3)
    truth = dict(zip(split.image_ids, split.captions))
    norm = lambda s: " ".join(s.lower().replace(".", " ").split())
    exact = sum(norm(r["caption"]) in {norm(c) for c in truth[r["image_id"]]} for r in results) / len(results)
    return exact, metrics, seconds, results[:5]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--coco-mini", default=None, help="overfit this COCO-layout folder's train split and score it")
    p.add_argument("--data-dir", default="data", help="where datasets and caches live (paths.data_dir)")
    a, user = p.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if a.coco_mini:
            overrides = [f"paths.data_dir={a.data_dir}", "data=coco", f"data.root={a.coco_mini}",
                         "data.splits={train: train2017, val: train2017}", "iterations=600", "batch_size=16",
                         "learning_rate=3e-3", "embeddings.freeze=false", *user]
            exact, metrics, seconds, sample = train_and_score(overrides, work, "overfit", "train2017")
            print(json.dumps({"dataset": "coco-mini train (overfit)", "exact_match": round(exact, 4),
                              "bleu4": round(metrics["Bleu_4"], 4), "cider": round(metrics["CIDEr"], 4),
                              "meteor": round(metrics.get("METEOR", float("nan")), 4), "train_s": round(seconds, 1),
                              "sample": sample}))
            return
        overrides = [f"paths.data_dir={a.data_dir}", "experiment=shapes", *user]
        exact, metrics, seconds, sample = train_and_score(overrides, work, "seeing", "val2017")
        blind, blind_metrics, blind_seconds, _ = train_and_score([*overrides, "blind=true"], work, "blind", "val2017")
    print("sample captions:", json.dumps(sample), file=sys.stderr)
    print(json.dumps({"exact_match": round(exact, 4), "blind_exact_match": round(blind, 4),
                      "bleu4": round(metrics["Bleu_4"], 4), "cider": round(metrics["CIDEr"], 4),
                      "blind_bleu4": round(blind_metrics["Bleu_4"], 4), "blind_cider": round(blind_metrics["CIDEr"], 4),
                      "train_s": round(seconds, 1), "blind_train_s": round(blind_seconds, 1)}))


if __name__ == "__main__":
    main()
