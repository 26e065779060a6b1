"""A results table of finished runs: each run's overrides and its validation metrics at its best val/CIDEr.

    python benchmarks/sweep_table.py outputs/runs/* [--metric val/CIDEr] [--drop data.root=... ...]

Reads what every run writes anyway (its TensorBoard scalars and Hydra's .hydra/overrides.yaml), so runs started one
by one (say, two at a time on a 2-core machine) make one table, like a multirun's results.md. Prints a Markdown
table; last line: JSON with the rows.
"""
import argparse
import json
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

COLUMNS = ["val/Bleu_1", "val/Bleu_4", "val/METEOR", "val/ROUGE_L", "val/CIDEr", "val/ppl"]


def scalars(run: Path) -> dict:
    """tag -> {step: value}, over all event files of the run (a resumed run writes several)."""
    out = {}
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def row(run: Path, metric: str, drop) -> dict:
    values = scalars(run)
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    r = {"run": run.name, "overrides": " ".join(o for o in overrides if o.split("=")[0] not in drop)}
    if metric not in values:
        return {**r, "best_step": None}
    step = max(values[metric], key=values[metric].get)
    steps = sorted(values[metric])
    r.update(best_step=step, evaluations=len(steps), of_step=steps[-1])
    for c in COLUMNS:  # val/ppl is logged at every validation, the captions' metrics at evaluations only
        if c in values:
            near = min(values[c], key=lambda s: abs(s - step))
            r[c] = round(values[c][near], 4)
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--metric", default="val/CIDEr")
    p.add_argument("--drop", nargs="*", default=["data.root", "paths.data_dir", "hydra.run.dir"],
                   help="override keys left out of the table (paths)")
    a = p.parse_args()
    rows = [row(r, a.metric, set(a.drop)) for r in a.runs if (r / ".hydra").is_dir()]
    cols = ["run", "overrides", *COLUMNS, "best_step", "of_step"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
