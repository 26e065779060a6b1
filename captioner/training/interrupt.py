"""Keep what an interrupted run has done: Ctrl-C, SIGTERM (what SLURM sends before a time limit) or a crash.

Lightning turns SIGINT into KeyboardInterrupt and SIGTERM into SIGTERMException at the next step, and calls every
callback's `on_exception` before it exits; there this saves a resumable checkpoint of the current step (the
History callback writes history.json and loss.png in its own `on_exception`) and the metrics so far.
"""
import logging
import os
from pathlib import Path

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from captioner.training.guards import NonFiniteError
from captioner.utils import METRICS_FILE, atomic_write_json, finite

log = logging.getLogger("captioner")


class SaveOnInterrupt(Callback):
    """Saves <run_dir>/checkpoints/last.ckpt and the metrics file when training is interrupted."""

    def __init__(self, run_dir):
        run_dir = Path(run_dir)
        self.ckpt_path, self.metrics_path = run_dir / "checkpoints" / "last.ckpt", run_dir / METRICS_FILE

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and exception.code is None:
            exception.code = 128 + 15  # Lightning re-raises this SystemExit: exit as killed by SIGTERM, not as done
        if trainer.global_step == 0 or trainer.fast_dev_run or isinstance(exception, NonFiniteError):
            return  # nothing trained yet, or diverged weights: keep whatever checkpoint is there
        # weights_only=False: optimizer state, loops and callbacks too, so `ckpt_path=` resumes from this step.
        # A temporary name, then a rename: a save cut short (a kill) leaves the previous last.ckpt whole
        tmp = self.ckpt_path.with_name(f".{self.ckpt_path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.ckpt_path)
            metrics = {k: finite(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            metrics.update(steps=trainer.global_step, checkpoint=str(self.ckpt_path),
                           interrupted=type(exception).__name__)
            atomic_write_json(self.metrics_path, metrics)
            log.warning("Interrupted (%s) at step %d: saved %s; resume with ckpt_path=%s", type(exception).__name__,
                        trainer.global_step, self.ckpt_path, self.ckpt_path)
