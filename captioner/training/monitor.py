"""What training shows besides the loss: every `eval_every` epochs, beam-search captions for (part of) the
validation set, scored with the COCO metrics (val/Bleu_4, val/CIDEr, ...), plus a few validation images with
their generated and reference captions in TensorBoard.

Decoding runs on the cached validation features (no image decoding); scoring runs on rank 0 and its result is
broadcast, so every process logs the same numbers.
"""
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from captioner.models.decoding import captions
from captioner.utils import atomic_copy, to_rgb

log = logging.getLogger(__name__)
LOGGED = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")  # SPICE is never computed here (spice=False)


def evaluation_due(trainer, every: int) -> bool:
    """Whether this validation also evaluates captions: every `every` epochs, and on the last epoch."""
    if every <= 0 or trainer.sanity_checking:
        return False
    return (trainer.current_epoch + 1) % every == 0 or last_validation(trainer)


def at_last_step(trainer) -> bool:
    """Whether a run of `iterations` steps (Lightning's max_steps) has reached its last one."""
    return (trainer.max_steps or 0) > 0 and trainer.global_step >= trainer.max_steps


def last_validation(trainer) -> bool:
    """Whether this is the run's last validation: at its last step (with `iterations`), or in its last epoch."""
    return at_last_step(trainer) or ((trainer.max_epochs or 0) > 0 and trainer.current_epoch + 1 >= trainer.max_epochs)


class ValidateLastStep(Callback):
    """The run's last step is validated, so what it reports (metrics.json, the log line, best.ckpt) is the model it
    ends with. Lightning would skip it in two cases: a run of `iterations` steps stops at max_steps without
    validating when that falls inside an epoch, and with check_val_every_n_epoch > 1 only those epochs validate.
    So the epoch holding the last step validates as with check_val_every_n_epoch=1 (as Lightning's fast_dev_run
    sets it), and the loop is asked to stop at max_steps, which makes it validate first (early stopping's path)."""

    def on_train_epoch_start(self, trainer, pl_module):
        every = trainer.check_val_every_n_epoch
        if every is not None and every > 1 and holds_last_step(trainer):
            trainer.check_val_every_n_epoch = 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if at_last_step(trainer):
            trainer.should_stop = True


def holds_last_step(trainer) -> bool:
    """Whether the epoch starting now holds the run's last step: the last epoch (last_validation), or the one in
    which max_steps falls (an optimizer step every accumulate_grad_batches batches, and at the epoch's end)."""
    steps = trainer.num_training_batches / trainer.accumulate_grad_batches
    return last_validation(trainer) or ((trainer.max_steps or 0) > 0
                                        and trainer.global_step + steps > trainer.max_steps - 1)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run that may resume another one: every run, resumed or not, writes into its own run
    dir, and ModelCheckpoint keeps its state (best score, paths) only when resumed in the same folder, warning
    otherwise. Here a resumed run takes the state over as if it had been saved in the new folder: the previous
    best checkpoint is copied in (so best.ckpt stays the best of the whole training, not of the part since the
    resume), and no path into the old run dir is kept, so nothing there is ever deleted."""

    @property
    def state_key(self) -> str:  # ModelCheckpoint's, so runs saved before this class resume with their state
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict):
        old_dir = state_dict.get("dirpath")
        if self.dirpath is None or old_dir is None or Path(old_dir) == Path(self.dirpath):
            return super().load_state_dict(state_dict)
        best, score = state_dict.get("best_model_path") or "", state_dict.get("best_model_score")
        state = {**state_dict, "dirpath": self.dirpath, "best_model_path": "", "kth_best_model_path": "",
                 "best_k_models": {}, "kth_value": self.kth_value, "last_model_path": "", "best_model_score": None}
        if self.monitor and score is not None and Path(best).is_file():
            here = str(Path(self.dirpath) / Path(best).name)
            atomic_copy(best, here)
            state.update(best_model_path=here, kth_best_model_path=here, best_k_models={here: score}, kth_value=score,
                         best_model_score=score)
        super().load_state_dict(state)


class BestCheckpoint(RunCheckpoint):
    """ModelCheckpoint for best.ckpt. Its own schedule (`every_n_epochs`, set to eval_every for an evaluation
    metric) misses the extra evaluation of the last epoch, so that one is compared here too (before the parent's
    hook, which then sees this step saved and does nothing).

    A run resumed from a checkpoint saved by its last step's validation, at an epoch's end, first finishes that
    epoch again: Lightning calls the epoch-end hooks before any validation of the new process. That epoch end was
    compared and saved already, and its val/loss is not among the new process's metrics, so it is skipped (the
    parent would only warn that the monitored key is missing)."""

    resumed_at = None  # the global step a run starts (or resumes) at

    def on_train_start(self, trainer, pl_module):
        self.resumed_at = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_step == self.resumed_at and self.monitor not in trainer.callback_metrics:
            return
        if self._should_save_on_train_epoch_end(trainer):  # validation ran at the end of the epoch: save now
            self._compare_last_evaluation(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if not self._should_save_on_train_epoch_end(trainer):
            self._compare_last_evaluation(trainer)
        super().on_validation_end(trainer, pl_module)

    def _compare_last_evaluation(self, trainer):
        every = self._every_n_epochs
        if (every > 1 and (trainer.current_epoch + 1) % every and evaluation_due(trainer, every)
                and not self._should_skip_saving_checkpoint(trainer)):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class CaptionMonitor(Callback):
    def __init__(self, every_n_epochs, max_images, beam_size, max_len, length_penalty, temperature=None, top_k=0,
                 seed=None, samples=6, batch_size=256, no_repeat_ngram_size=0):
        self.every, self.max_images, self.samples = every_n_epochs, max_images, samples
        # the decoding of conf/decode/, as caption and evaluate use it (decode=sample: sampled, with the run's seed)
        self.decode = dict(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty,
                           temperature=temperature, top_k=top_k, seed=seed, no_repeat_ngram_size=no_repeat_ngram_size)
        self.batch_size = batch_size

    def _due(self, trainer) -> bool:
        return evaluation_due(trainer, self.every)

    def captions(self, pl_module, dm):
        """Captions of the first `max_images` validation images (beam search, or sampled), as COCO results."""
        feats, ids = dm.val_images(self.max_images)
        out = []
        was_training = pl_module.training
        pl_module.eval()
        for s in range(0, len(ids), self.batch_size):
            batch = feats[s:s + self.batch_size].to(pl_module.device)
            out += [c[0][0] for c in captions(pl_module.model, pl_module.vocab, batch, **self.decode)]
        pl_module.train(was_training)
        return [{"image_id": int(i), "caption": c} for i, c in zip(ids, out)]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._due(trainer):
            return
        dm = trainer.datamodule
        results = self.captions(pl_module, dm)
        metrics = None
        if trainer.is_global_zero:
            references = {r["image_id"]: dm.val_references[r["image_id"]] for r in results}
            from captioner.evaluation.metrics import score  # pycocoevalcap: only when scoring (bare GPU machines lack it)

            metrics = {k: v for k, v in score(results, references, spice=False).items() if k in LOGGED}
            self.log_samples(trainer, dm, results, references, pl_module)
        metrics = trainer.strategy.broadcast(metrics)
        for name, value in metrics.items():
            pl_module.log(f"val/{name}", value)
        if trainer.is_global_zero:
            log.info("Epoch %d validation captions: %s", trainer.current_epoch,
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def log_samples(self, trainer, dm, results, references, pl_module=None):
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        tb, step = loggers[0].experiment, trainer.global_step
        lines = ["| image | generated | references |", "| --- | --- | --- |"]
        rows = self.attention(pl_module, dm, results[:self.samples]) if pl_module is not None else None
        for n, r in enumerate(results[:self.samples]):
            refs = " / ".join(references[r["image_id"]])
            lines.append(f"| {r['image_id']} | {r['caption']} | {refs} |")
            path = dm.val_paths.get(r["image_id"])
            try:
                with Image.open(path) as im:
                    im = to_rgb(im)
                    if rows is not None:  # attention models: where each word looked (Figure 2 style)
                        from captioner.evaluation.attention import attention_figure

                        tb.add_figure(f"attention/{r['image_id']}", attention_figure(im, r["caption"], rows[n]), step)
                    im.thumbnail((256, 256))
                    tb.add_image(f"samples/{r['image_id']}", np.asarray(im), step, dataformats="HWC")
            except (OSError, TypeError, ValueError):
                pass  # a sample picture is a nicety; its caption is still in the table
            tb.add_text(f"samples/{r['image_id']}", f"**{r['caption']}** — {refs}", step)
        tb.add_text("val/samples", "\n".join(lines), step)

    @staticmethod
    def attention(pl_module, dm, results):
        """The attention rows of the first validation images' captions (val_images' order), or None."""
        from captioner.evaluation.attention import attention_rows, has_attention

        if not results or not has_attention(pl_module.model):
            return None
        feats, _ = dm.val_images(len(results))
        return attention_rows(pl_module.model, pl_module.vocab, feats.to(pl_module.device),
                              [r["caption"] for r in results])


class LossProgressBar(TQDMProgressBar):
    """tqdm's bar with the training loss (and SCST's reward), read from the logged metrics only when the bar
    refreshes: metrics logged with prog_bar=True are turned into numbers after every batch, which on a GPU
    makes every step wait for the device."""

    SHOWN = ("train/loss", "train/reward")

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        for name in self.SHOWN:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                items[name] = f"{float(value):.3f}"
        return items
