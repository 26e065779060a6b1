"""The LightningModule: Show and Tell + cross-entropy over real tokens, perplexity logging, optimizer from config."""
import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from captioner.model import ShowAndTell, WordEmbedding
from captioner.vocab import PAD, Vocabulary


class CaptionModule(pl.LightningModule):
    """Everything needed to caption later is in the hyperparameters (and so in every checkpoint):
    the vocabulary, the encoder and its preprocessing, the model sizes and the word-vector choice."""

    def __init__(self, itos, feature_dim, preprocess, embeddings, hidden_size=512, num_layers=1, rnn_type="lstm",
                 optimizer=None, learning_rate=1e-4, config=None, pretrained=None, has_vector=None, blind=False,
                 compile=False):
        super().__init__()
        # the pretrained matrix lives in the state dict (a buffer), not in the hyperparameters
        self.save_hyperparameters(ignore=["pretrained", "has_vector"], logger=False)
        self.vocab = Vocabulary(itos)
        embedding = WordEmbedding(len(itos), embeddings["dim"], embeddings.get("freeze", False), pretrained, has_vector)
        self.model = ShowAndTell(feature_dim, len(itos), embedding, hidden_size, num_layers, rnn_type, blind)
        self.val_loss = MeanMetric()
        # opt-in: the loss (model forward + cross-entropy, and so its backward) as a torch.compile graph; true or
        # a torch.compile mode such as "reduce-overhead" (CUDA graphs). Batches are then padded to few lengths.
        self.compiled_loss = None
        if compile:
            mode = None if compile is True else str(compile)
            self.compiled_loss = torch.compile(self.loss, mode=mode)

    def loss(self, batch):
        """Mean cross-entropy per real token (and the number of real tokens)."""
        features, inputs, targets = batch
        hidden, _ = self.model(features, inputs)
        if hidden.is_cuda or self.compiled_loss is not None:
            # fixed shapes: score every position and ignore the pads (boolean indexing would wait for the GPU
            # and gives a compiled graph a data-dependent size)
            logits, targets = self.model.out(hidden).flatten(0, 1), targets.flatten()
        else:  # on a CPU the output layer is the cost: run it on the real (non-pad) positions only
            mask = targets != PAD
            logits, targets = self.model.out(hidden[mask]), targets[mask]
        return F.cross_entropy(logits.float(), targets, ignore_index=PAD), (targets != PAD).sum()

    def training_step(self, batch, batch_idx):
        loss, _ = (self.compiled_loss or self.loss)(batch)
        # on intervals only: a logged value is read back (a device sync) when loggers or the progress bar use it
        step, trainer = self.global_step + 1, self.trainer  # the logger writes when step % log_every_n_steps == 0
        if step % trainer.log_every_n_steps == 0 or step == 1 or trainer.is_last_batch or step == trainer.max_steps:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/ppl", loss.exp())
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n_tokens = self.loss(batch)
        self.val_loss.update(loss, weight=n_tokens)  # token-weighted, reduced across processes

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp(), prog_bar=True)

    def configure_optimizers(self):
        cfg = dict(self.hparams.optimizer or {"_target_": "torch.optim.Adam", "amsgrad": True})
        if self.device.type == "cuda" and cfg["_target_"] in ("torch.optim.Adam", "torch.optim.AdamW"):
            cfg.setdefault("fused", True)
        return hydra.utils.instantiate(cfg, params=self.parameters(), lr=self.hparams.learning_rate)
