"""Multirun results table: a Hydra callback that adds one row per finished job to results.csv / results.md
in the sweep directory, so a crashed job shows as failed rather than missing.

Each job writes its own `result.json`; the table is rebuilt from all of them (atomically) after every job and
once more at the end, so jobs finishing at the same time on a cluster cannot lose each other's rows.
"""
import csv
import io
import json
import time
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from captioner.cli import one_line
from captioner.utils import METRICS_FILE, atomic_write_text

COLUMNS = ["job", "status", "overrides", "val/loss", "val/ppl", "steps", "wall_s", "run_dir", "checkpoint", "error"]


class SweepResults(Callback):
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.time()

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        metrics_file = run_dir / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        failed = job_return.status != JobStatus.COMPLETED
        row = {"job": config.hydra.job.num, "status": "failed" if failed else "completed",
               "overrides": " ".join(job_return.overrides or []), "wall_s": round(time.time() - self.start, 1),
               "run_dir": str(run_dir), "error": one_line(job_return._return_value) if failed else "",
               **metrics}
        atomic_write_text(run_dir / "result.json", json.dumps(row))
        write_table(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        write_table(Path(config.hydra.sweep.dir))


def write_table(sweep_dir: Path) -> list:
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]
    rows.sort(key=lambda r: int(r["job"]))
    metric_cols = sorted({k for r in rows for k in r} - set(COLUMNS))  # evaluation metrics, when present
    cols = COLUMNS[:5] + metric_cols + COLUMNS[5:]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(sweep_dir / "results.csv", buf.getvalue())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "")
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    atomic_write_text(sweep_dir / "results.md", "\n".join(md) + "\n")
    return rows
