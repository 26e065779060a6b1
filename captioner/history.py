"""The seed's training history: a loss point every `write_every` minutes, saved as JSON and plotted at the end."""
import json
import time
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import Callback

from captioner.utils import atomic_write_text


class History(Callback):
    def __init__(self, run_dir, write_every_min: float):
        self.path = Path(run_dir) / "history.json"
        self.every = write_every_min * 60
        self.history = {"iterations": [], "loss": [], "val_loss": []}
        self.last = None

    def on_train_start(self, trainer, pl_module):
        self.last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and time.monotonic() - self.last >= self.every:
            self.write(trainer)

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.write(trainer)
        self.plot()

    def write(self, trainer):
        self.last = time.monotonic()
        metrics = trainer.callback_metrics
        if "train/loss" not in metrics:
            return
        self.history["iterations"].append(trainer.global_step)
        self.history["loss"].append(float(metrics["train/loss"]))
        self.history["val_loss"].append(float(metrics["val/loss"]) if "val/loss" in metrics else None)
        atomic_write_text(self.path, json.dumps(self.history))

    def plot(self):
        """Loss and perplexity, train and val, log scale (the seed notebook's plots), as loss.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        if not h["iterations"]:
            return
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        val = np.array([np.nan if v is None else v for v in h["val_loss"]])
        for ax, f, title in ((axes[0], lambda x: x, "loss"), (axes[1], np.exp, "perplexity")):
            ax.plot(h["iterations"], f(np.array(h["loss"])), label=f"train {title}")
            ax.plot(h["iterations"], f(val), label=f"val {title}")
            ax.set_yscale("log")
            ax.set_xlabel("optimizer steps")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss.png"))
        plt.close(fig)
