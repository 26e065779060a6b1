"""What training shows besides the loss: every `eval_every` epochs, beam-search captions for (part of) the
validation set, scored with the COCO metrics (val/Bleu_4, val/CIDEr, ...), plus a few validation images with
their generated and reference captions in TensorBoard.

Decoding runs on the cached validation features (no image decoding); scoring runs on rank 0 and its result is
broadcast, so every process logs the same numbers.
"""
import logging

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from captioner.decoding import beam_search

log = logging.getLogger(__name__)
LOGGED = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


class CaptionMonitor(Callback):
    def __init__(self, every_n_epochs=5, max_images=500, beam_size=3, max_len=20, samples=6, batch_size=256):
        self.every, self.max_images, self.samples = every_n_epochs, max_images, samples
        self.decode = dict(beam_size=beam_size, max_len=max_len)
        self.batch_size = batch_size

    def _due(self, trainer) -> bool:
        if self.every <= 0 or trainer.sanity_checking:
            return False
        # with `iterations`, max_epochs is -1: there is no last epoch to single out
        last = (trainer.max_epochs or 0) > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
        return (trainer.current_epoch + 1) % self.every == 0 or last

    @torch.no_grad()
    def captions(self, pl_module, dm):
        ds, ids = dm.datasets["val"], dm.image_ids["val"][:self.max_images]
        rows = np.arange(len(ids))
        out = []
        was_training = pl_module.training
        pl_module.eval()
        for s in range(0, len(rows), self.batch_size):
            feats = ds.__getitems__(rows[s:s + self.batch_size])[0].to(pl_module.device)
            tokens, _, _ = beam_search(pl_module.model, feats, **self.decode)
            out += [pl_module.vocab.decode(t) for t in tokens[:, 0].tolist()]
        pl_module.train(was_training)
        return [{"image_id": int(i), "caption": c} for i, c in zip(ids, out)]

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._due(trainer):
            return
        dm = trainer.datamodule
        results = self.captions(pl_module, dm)
        metrics = None
        if trainer.is_global_zero:
            from captioner.metrics import score  # pycocoevalcap: only when scoring (GPU machines may lack it)

            references = {r["image_id"]: dm.references["val"][r["image_id"]] for r in results}
            metrics = {k: v for k, v in score(results, references, spice=False).items() if k in LOGGED}
            self.log_samples(trainer, dm, results, references)
        metrics = trainer.strategy.broadcast(metrics)
        for name, value in metrics.items():
            pl_module.log(f"val/{name}", value)
        log.info("Epoch %d validation captions: %s", trainer.current_epoch,
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def log_samples(self, trainer, dm, results, references):
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        tb, step = loggers[0].experiment, trainer.global_step
        lines = ["| image | generated | references |", "| --- | --- | --- |"]
        for r in results[:self.samples]:
            refs = " / ".join(references[r["image_id"]])
            lines.append(f"| {r['image_id']} | {r['caption']} | {refs} |")
            path = dm.image_paths["val"].get(r["image_id"])
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((256, 256))
                    tb.add_image(f"samples/{r['image_id']}", np.asarray(im), step, dataformats="HWC")
            except (OSError, TypeError, ValueError):
                pass  # a sample picture is a nicety; its caption is still in the table
            tb.add_text(f"samples/{r['image_id']}", f"**{r['caption']}** — {refs}", step)
        tb.add_text("val/samples", "\n".join(lines), step)
