"""Stop training on the first non-finite loss, with one sentence, before a NaN model is saved as best.ckpt."""
import math

from pytorch_lightning.callbacks import Callback

from captioner.utils import CaptionerError

ADVICE = "lower learning_rate, set trainer.gradient_clip_val (e.g. 1.0), or resume from an earlier checkpoint"


class NonFiniteError(CaptionerError):
    """Training diverged: SaveOnInterrupt keeps no checkpoint of the diverged weights."""


class StopOnNonFinite(Callback):
    """Reads the loss only where it is read anyway: on the steps the module logs it (every
    trainer.log_every_n_steps, the first and an epoch's last) and after validation. Reading it every step would
    make each GPU step wait for the device. Runs before the checkpoint callbacks (Lightning calls ModelCheckpoints
    last), so best.ckpt is never written with a NaN val/loss."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % trainer.log_every_n_steps and step != 1 and not trainer.is_last_batch:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteError(f"training diverged: the loss is {float(loss)} at step {trainer.global_step}; "
                                 f"{ADVICE}.")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/") and name.endswith("loss") and not math.isfinite(float(value)):
                raise NonFiniteError(f"training diverged: {name} is {float(value)} after step {trainer.global_step}; "
                                     f"{ADVICE}.")
