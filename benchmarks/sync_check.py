"""Where the training step waits for the GPU: every synchronising CUDA call (torch.cuda.set_sync_debug_mode)
during 200 steps of the real CaptionModule and CaptionBatches through the Lightning Trainer, as in
train_throughput.py (resident data, bf16-mixed, batch 256, logging every 50 steps). GPU only.

    python benchmarks/sync_check.py [--steps 200]

Last line: JSON with steps, syncs (total) and the source lines that synchronised, most frequent first.
"""
import argparse
import collections
import json
import tempfile
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from captioner.data.datamodule import CaptionDataModule
from train_throughput import BS, make_module, synthetic


class SyncRecorder(Callback):
    def on_train_start(self, trainer, pl_module):
        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")
        self.catcher.__exit__(None, None, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    assert torch.cuda.is_available(), "sync_check.py measures CUDA synchronisations: it needs a GPU"
    with tempfile.TemporaryDirectory() as folder:
        ds = synthetic(BS * a.steps, folder)
        dm = CaptionDataModule(datasets={"train": ds, "val": ds}, batch_size=BS, shuffle=True)
        module = make_module()
        recorder = SyncRecorder()
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1,
                             limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
                             callbacks=[recorder])
        trainer.fit(module, datamodule=dm)
    sources = collections.Counter(f"{w.filename}:{w.lineno}" for w in recorder.caught
                                  if "synchroniz" in str(w.message))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": a.steps,
                      "syncs": sum(sources.values()), "sources": sources.most_common(12)}))


if __name__ == "__main__":
    main()
