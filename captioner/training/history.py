"""The training history: the train loss every `log_every_n_steps` steps and the validation loss at every
validation, kept in the checkpoint (so a resumed run continues it), written to history.json every `write_every`
minutes and at the end, and plotted as loss.png (also when the run is interrupted)."""
import time
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import Callback

from captioner.utils import atomic_write_json, finite


def empty_history() -> dict:
    return {"iterations": [], "loss": [], "val_iterations": [], "val_loss": []}


class History(Callback):
    def __init__(self, run_dir, write_every_min: float):
        self.path = Path(run_dir) / "history.json"
        self.every = write_every_min * 60
        self.history = empty_history()
        self.last = time.monotonic()

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {**empty_history(), **state_dict.get("history", {})}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.add_train_point(trainer)
        if time.monotonic() - self.last >= self.every:
            self.write(trainer)

    def add_train_point(self, trainer):
        step, h = trainer.global_step, self.history
        if "train/loss" in trainer.callback_metrics and (not h["iterations"] or h["iterations"][-1] != step):
            h["iterations"].append(step)
            h["loss"].append(finite(trainer.callback_metrics["train/loss"]))  # NaN: null, as JSON has it

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        step = trainer.global_step
        if not self.history["val_iterations"] or self.history["val_iterations"][-1] != step:
            self.history["val_iterations"].append(step)
            self.history["val_loss"].append(finite(trainer.callback_metrics["val/loss"]))

    def on_train_end(self, trainer, pl_module):
        self.finish(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self.finish(trainer)

    def finish(self, trainer):
        self.add_train_point(trainer)  # the last step, whatever the interval
        self.write(trainer)
        if trainer.is_global_zero:
            self.plot(getattr(trainer.lightning_module, "train_loss", "cross-entropy"))

    def write(self, trainer):
        self.last = time.monotonic()
        if trainer.is_global_zero:
            atomic_write_json(self.path, self.history, indent=None)

    def plot(self, train_loss="cross-entropy"):
        """Loss and perplexity, train and val, log scale (the seed notebook's plots), as loss.png. A training loss
        that is not a cross-entropy (SCST's policy loss, which can be negative) gets its own linear panel."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        if not h["iterations"] and not h["val_iterations"]:
            return
        ce = train_loss == "cross-entropy"
        fig, axes = plt.subplots(1, 2 if ce else 3, figsize=(10 if ce else 15, 4))
        for ax, f, title in ((axes[0], lambda x: x, "loss"), (axes[1], np.exp, "perplexity")):
            if ce:
                ax.plot(h["iterations"], f(np.array(h["loss"], dtype=float)), label=f"train {title}")
            ax.plot(h["val_iterations"], f(np.array(h["val_loss"], dtype=float)), "o-", label=f"val {title}")
            ax.set_yscale("log")
            ax.set_title(title)
        if not ce:
            axes[2].plot(h["iterations"], np.array(h["loss"], dtype=float), label=f"train {train_loss}")
            axes[2].set_title(train_loss)
        for ax in axes:
            ax.set_xlabel("optimizer steps")
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss.png"))
        plt.close(fig)
