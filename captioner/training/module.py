"""The LightningModule: a captioning model (the model/ group) + cross-entropy over the real tokens, perplexity logging, optimizer from config."""
import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from captioner.models.decoding import draw
from captioner.training.graphs import StepGraphs
from captioner.models import WordEmbedding, make_model
from captioner.utils import CaptionerError
from captioner.data.vocab import PAD, Vocabulary


class CaptionModule(pl.LightningModule):
    """Everything needed to caption later is in the hyperparameters (and so in every checkpoint):
    the vocabulary, the encoder and its preprocessing, the model sizes and the word-vector choice."""
    train_loss = "cross-entropy"  # what train/loss is (History plots it with val/loss, and its exp as perplexity)

    def __init__(self, itos, feature_dim, preprocess, embeddings, model=None, optimizer=None, learning_rate=1e-4,
                 config=None, pretrained=None, has_vector=None, label_smoothing=0.0, scheduler=None,
                 scheduled_sampling=None, compile=False, **show_and_tell):
        """`model`: a model/ config or a checkpoint's model entry (models.make_model). Without it, the keyword
        arguments left (hidden_size, rnn_type, ... of checkpoints from before the model/ group) are a show_and_tell."""
        super().__init__()
        # the pretrained matrix lives in the state dict (a buffer), not in the hyperparameters
        self.save_hyperparameters(ignore=["pretrained", "has_vector"], logger=False)
        self.vocab = Vocabulary(itos)
        embedding = WordEmbedding(len(itos), embeddings["dim"], embeddings.get("freeze", False), pretrained, has_vector)
        self.model = make_model(model or {"name": "show_and_tell", **show_and_tell}, feature_dim, len(itos), embedding)
        for key in show_and_tell:
            self.hparams.pop(key, None)
        self.hparams["model"] = self.model.entry  # the registry name and arguments: what load_model rebuilds
        self.val_loss = MeanMetric()
        # opt-in: "graphs" replays the loss's forward and backward as CUDA graphs, one per batch shape (StepGraphs);
        # true or a torch.compile mode ("reduce-overhead", ...) compiles the loss. Batches are then padded to few
        # lengths.
        self.compiled_loss = self.step_graphs = None
        if compile == "graphs":
            self.step_graphs = StepGraphs(self.model, self.loss)
        elif compile:
            self.compiled_loss = torch.compile(self.loss, mode=compile_mode(compile))

    def loss(self, batch):
        """Mean cross-entropy per real token, and the targets it scored (their non-<pad> count is the mean's weight).

        The output layer is the step's main cost. With the batch's `real` positions (CaptionBatches computes them on
        the host) it runs on the real tokens only, and nothing waits for the device; padded entries of `real` (a
        graphed step's fixed shapes) point at a <pad> target, which is ignored. Without them, as in a compiled loss,
        which needs fixed shapes, every position is scored and the pads are ignored."""
        features, inputs, targets = batch[:3]
        hidden, _ = self.model(features, inputs)
        if len(batch) > 3:
            real = batch[3]
            logits = self.model.logits(hidden.flatten(0, 1).index_select(0, real))
            targets = targets.flatten().index_select(0, real)
        else:
            logits, targets = self.model.logits(hidden).flatten(0, 1), targets.flatten()
        smoothing = self.hparams.label_smoothing if self.training else 0.0  # val/loss stays the plain cross-entropy
        loss = F.cross_entropy(logits.float(), targets, ignore_index=PAD, label_smoothing=smoothing)
        if self.training and self.model.aux_loss is not None:  # the model's own term (CaptionModel.aux_loss)
            loss = loss + self.model.aux_loss
        return loss, targets

    def training_step(self, batch, batch_idx):
        p = self.sampling_probability()
        if p > 0:
            loss = self.scheduled_sampling_loss(batch, p)
        elif self.compiled_loss is not None:  # fixed shapes: not the real positions, whose count varies
            loss = self.compiled_loss(batch[:3])[0]
        elif self.step_graphs is not None:
            loss = self.step_graphs(batch)
        else:
            loss = self.loss(batch)[0]
        # on intervals only: a logged value is read back (a device sync) when loggers or the progress bar use it
        step, trainer = self.global_step + 1, self.trainer  # the logger writes when step % log_every_n_steps == 0
        if step % trainer.log_every_n_steps == 0 or step == 1 or trainer.is_last_batch or step == trainer.max_steps:
            # not prog_bar: Lightning converts every progress-bar value to a number after each batch, a device
            # sync per step; the progress bar (monitor.LossProgressBar) reads it only when it refreshes
            logged = loss if self.step_graphs is None else loss.detach().clone()  # replays overwrite a graph output
            if p == 0 and self.model.aux_loss is not None:  # train/loss stays the cross-entropy, like val/loss
                aux = self.model.aux_loss.detach().clone()
                self.log("train/aux_loss", aux)
                logged = logged.detach() - aux
            self.log("train/loss", logged)
            self.log("train/ppl", logged.exp())
        return loss

    def __setattr__(self, name, value):
        """Lightning sets `_current_fx_name` twice around every hook it calls, some 50 times a step, and a GPU step
        of this model is bound by host time. It is neither a parameter, a buffer nor a module, so nn.Module's
        checks of every attribute it sets are skipped for it."""
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage):
        if self.step_graphs is not None:
            self.step_graphs.accumulate = self.trainer.accumulate_grad_batches > 1

    def validation_step(self, batch, batch_idx):
        loss, targets = self.loss(batch)
        self.val_loss.update(loss, weight=(targets != PAD).sum())  # token-weighted, reduced across processes

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp(), prog_bar=True)

    def configure_optimizers(self):
        cfg = dict(self.hparams.optimizer or {"_target_": "torch.optim.Adam", "amsgrad": True})
        if self.device.type == "cuda" and cfg["_target_"] in ("torch.optim.Adam", "torch.optim.AdamW"):
            cfg.setdefault("fused", True)
        optimizer = hydra.utils.instantiate(cfg, params=self.parameters(), lr=self.hparams.learning_rate)
        scheduler = make_scheduler(optimizer, self.hparams.scheduler, lambda: self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def sampling_probability(self, epoch=None) -> float:
        """Scheduled sampling's p at this epoch: 0 before `start`, then + `increase_prob` every `increase_every`
        epochs up to `max_prob` (ruotianluo's scheduled_sampling_* options)."""
        ss, epoch = self.hparams.scheduled_sampling or {}, self.current_epoch if epoch is None else epoch
        if not ss.get("max_prob") or epoch < ss.get("start", 0):
            return 0.0
        steps = (epoch - ss.get("start", 0)) // max(1, ss.get("increase_every", 1))
        return min(ss.get("increase_prob", 0.05) * steps, ss["max_prob"])

    def scheduled_sampling_loss(self, batch, p: float):
        """Cross-entropy where each step's input is, with probability p, the model's own previous prediction
        (sampled from its distribution) instead of the reference word (Bengio et al., 2015). One RNN step at a time,
        the whole batch together; positions after the caption's end keep <pad>."""
        features, inputs, targets = batch[:3]
        state = self.model.initial_state(features)
        words, logits = inputs[:, 0], []
        for t in range(inputs.shape[1]):
            if t > 0:
                own = draw(logits[-1].detach())
                use_own = (torch.rand(own.shape, device=own.device) < p) & (inputs[:, t] != PAD)
                words = torch.where(use_own, own, inputs[:, t])
            step_logits, state = self.model.step(words, state)
            logits.append(step_logits)
        real = batch[3] if len(batch) > 3 else (targets.flatten() != PAD).nonzero().view(-1)
        return F.cross_entropy(torch.stack(logits, 1).flatten(0, 1).index_select(0, real).float(),
                               targets.flatten().index_select(0, real), ignore_index=PAD,  # padded `real` entries
                               label_smoothing=self.hparams.label_smoothing)

    def on_train_epoch_start(self):
        if (self.hparams.scheduled_sampling or {}).get("max_prob"):
            self.log("train/ss_prob", self.sampling_probability())


def compile_mode(compile):
    """The torch.compile mode of a `compile` setting: true is torch's default; "graphs" (the cross-entropy step as
    CUDA graphs, StepGraphs) is torch.compile's CUDA graphs where a step is compiled instead (SCST)."""
    return {True: None, "graphs": "reduce-overhead"}.get(compile, str(compile))


def make_scheduler(optimizer, cfg, total_steps: callable) -> dict:
    """The learning-rate schedule as a Lightning scheduler config; LearningRateMonitor logs it as train/lr.
    `none` is the seed's constant rate (a constant factor 1, so train/lr is logged the same way)."""
    cfg = dict(cfg or {"name": "none"})
    name, sched = cfg.get("name", "none"), torch.optim.lr_scheduler
    entry = {"name": "train/lr", "interval": "step"}
    if name == "none":  # stepped once an epoch: it changes nothing, and a step's time counts on a GPU
        return {**entry, "interval": "epoch", "scheduler": sched.ConstantLR(optimizer, factor=1.0, total_iters=0)}
    if name == "step":  # multiply by gamma every step_size epochs
        return {**entry, "interval": "epoch",
                "scheduler": sched.StepLR(optimizer, step_size=cfg["step_size"], gamma=cfg["gamma"])}
    if name == "cosine":  # linear warmup from warmup_start_factor, then cosine decay to min_factor at the end
        warmup = int(cfg["warmup_steps"])
        total = max(int(total_steps()), warmup + 1)  # only here: estimating it builds the training loader
        base = optimizer.param_groups[0]["lr"]
        return {**entry, "scheduler": sched.SequentialLR(optimizer, [
            sched.LinearLR(optimizer, start_factor=cfg["warmup_start_factor"], total_iters=max(warmup, 1)),
            sched.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=base * cfg["min_factor"])],
            milestones=[warmup])}
    if name == "plateau":  # cut by `factor` when val/loss stalls for `patience` validations
        return {**entry, "interval": "epoch", "monitor": "val/loss",
                "strict": False, "scheduler": sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg["factor"],
                                                     patience=cfg["patience"])}
    raise CaptionerError(f"scheduler={name} is not one of none, step, cosine, plateau.")
