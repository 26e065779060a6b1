"""Stop training on the first non-finite loss, with one sentence, before a NaN model is saved as best.ckpt."""
import math

from pytorch_lightning.callbacks import Callback

from captioner.utils import CaptionerError

ADVICE = "lower learning_rate, set trainer.gradient_clip_val (e.g. 1.0), or resume from an earlier checkpoint"


class NonFiniteError(CaptionerError):
    """Training diverged: SaveOnInterrupt keeps no checkpoint of the diverged weights."""


class StopOnNonFinite(Callback):
    """Reads the training loss only on the steps the module logs it (every trainer.log_every_n_steps, the first,
    an epoch's last), where loggers read it too: reading it every step would make each GPU step wait for the device.
    Validation metrics are numbers already. Runs before the checkpoint callbacks (Lightning calls ModelCheckpoints
    last), so best.ckpt is never written with a NaN score."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % trainer.log_every_n_steps and step != 1 and not trainer.is_last_batch:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float("nan") if loss is None else float(loss)
        # every process decides together (one small all-reduce on these steps): one process stopping alone
        # would leave the others waiting for it in the next gradient all-reduce
        if trainer.strategy.reduce_boolean_decision(loss is not None and not math.isfinite(value), all=False):
            shown = value if not math.isfinite(value) else "not finite in another process"
            raise NonFiniteError(f"training diverged: the loss is {shown} at step {step}; {ADVICE}.")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():  # the same on every process (reduced)
            if name.startswith("val/") and not math.isfinite(float(value)):
                raise NonFiniteError(f"training diverged: {name} is {float(value)} after step {trainer.global_step}; "
                                     f"{ADVICE}.")
