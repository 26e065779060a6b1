"""Self-critical sequence training (Rennie et al., 2017): the policy-gradient stage after cross-entropy.

For each image, K captions are sampled without autograd (decoding.sample: one batched draw per word for all
B * K captions), each is rewarded with CIDEr-D against all the image's reference captions (document frequencies
of the training references, computed once), and the loss is -(reward - baseline) * log p(caption), per token,
with log p recomputed in one teacher-forced pass over all the samples (the step's only pass with autograd). The
baseline is the mean reward of the image's other samples (`scst.baseline=mean`, "new self-critical") or the reward
of its greedy caption (`scst.baseline=greedy`). Validation is the cross-entropy module's, plus val/CIDEr from the
caption monitor.
"""
import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from captioner.evaluation.cider import CiderD, reference_tensor
from captioner.models.decoding import beam_search, sample
from captioner.training.module import CaptionModule, compile_mode
from captioner.data.vocab import PAD, START, UNK

log = logging.getLogger(__name__)
DEFAULTS = {"samples": 5, "baseline": "mean", "max_len": 16}


class ImageRows(Dataset):
    """A CaptionBatches whose batches also carry their image rows, so the reward can find all references."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getattr__(self, name):  # set_epoch, features, to_device, ... are the wrapped dataset's
        if name == "base":  # not set yet (unpickling in a DataLoader worker): an AttributeError, as pickle expects
            raise AttributeError(name)
        return getattr(self.base, name)

    def __setattr__(self, name, value):  # and so are its settings (the data module sets pad_to)
        if name == "base":
            super().__setattr__(name, value)
        else:
            setattr(self.base, name, value)

    def __getitems__(self, indices):
        return (*self.base.__getitems__(indices), torch.as_tensor(self.base.image_rows(indices), dtype=torch.long))

    def __getitem__(self, i):
        return self.__getitems__([i])


def _specials_bias(vocab_size: int, device):
    """Added to logits: -inf for <pad>, <start> and <unk>, which are never sampled (as decoding's masking, but an
    addition, which autograd can go through and whose backward pass copies nothing)."""
    bias = torch.zeros(vocab_size, device=device)
    bias[PAD:START + 1] = float("-inf")  # PAD, START = 0, 1 (a fill: no index tensor to copy to the device)
    bias[UNK] = float("-inf")
    return bias


def caption_nll(model, features, tokens, real_only=None):
    """-log p of each token of sampled captions [N, T] (0 at <pad>) of the images `features` [N, ...], under the
    distribution they were sampled from, in one teacher-forced pass of the RNN over all N captions: the policy
    gradient's only pass with autograd, and its output layer runs once over the whole batch instead of once per
    word. With dropout, its masks are drawn anew here. `real_only` (default: on a CPU) runs the output layer on the
    real tokens only; otherwise every position is scored with fixed shapes (boolean indexing would make a GPU
    wait) and the pads are ignored."""
    inputs = torch.cat([torch.full_like(tokens[:, :1], START), tokens[:, :-1]], 1)
    hidden, _ = model(features, inputs)
    if not (hidden.device.type == "cpu" if real_only is None else real_only):
        logits = (model.logits(hidden) + _specials_bias(model.vocab_size, hidden.device)).flatten(0, 1)
        return F.cross_entropy(logits, tokens.flatten(), ignore_index=PAD, reduction="none").view_as(tokens)
    real = tokens != PAD
    logits = model.logits(hidden[real]) + _specials_bias(model.vocab_size, hidden.device)
    nll = F.cross_entropy(logits, tokens[real], reduction="none")
    return torch.zeros(tokens.shape, dtype=nll.dtype, device=nll.device).index_put((real,), nll)


def compiled(fn, mode=None):
    """fn as torch.compile graphs, one per input shape. Its output is copied out at once: a CUDA graph's output
    ("reduce-overhead") lives in memory that the next call of any compiled function may overwrite. Not fullgraph:
    past torch's limit of recompilations (say, many batch sizes in one process) it runs eagerly instead of failing."""
    graph = torch.compile(fn, dynamic=False, mode=mode)
    return lambda *args: graph(*args).clone()


def policy_loss(logps, tokens, advantage):
    """REINFORCE with a baseline: -(reward - baseline) * log p, averaged over the sampled tokens."""
    mask = tokens != PAD
    return -(logps * advantage.detach()[:, None].to(logps.dtype) * mask).sum() / mask.sum().clamp(min=1)


def baseline_of(rewards, k: int, kind: str, greedy_rewards=None):
    if kind == "greedy":
        return greedy_rewards.repeat_interleave(k)
    r = rewards.view(-1, k)  # mean of the other samples of the same image
    return ((r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


class SCSTModule(CaptionModule):
    """The cross-entropy module with an SCST training step. Same weights and hyperparameters, so its checkpoints
    caption, evaluate and serve like any other; settings come from the run config's `scst` block."""
    train_loss = "SCST policy loss"  # what train/loss is (loss.png plots it apart from the cross-entropy)

    def settings(self) -> dict:
        return {**DEFAULTS, **((self.hparams.config or {}).get("scst") or {})}

    def setup(self, stage):
        train = self.trainer.datamodule.datasets.get("train")  # before the training loader is made
        if stage == "fit" and not isinstance(train, ImageRows):
            self.trainer.datamodule.datasets["train"] = ImageRows(train)

    def on_fit_start(self):
        refs = reference_tensor(self.trainer.datamodule.datasets["train"].base)
        self.prepare(refs)
        log.info("SCST: CIDEr-D document frequencies of %d training images (%d n-grams); %d samples per image, "
                 "%s baseline.", len(refs), len(self.cider.df_codes), self.settings()["samples"],
                 self.settings()["baseline"])

    def prepare(self, refs):
        """The reward's document frequencies (once per run) and references [images, R, L]; with `compile`, the
        sampling loop and the reward as graphs (fixed shapes; one CUDA graph each with "reduce-overhead")."""
        self.cider = CiderD(refs, len(self.vocab)).to(self.device)
        self.references = refs.to(self.device)
        self.sampler, self.reward = sample, self.cider
        if self.hparams.compile:
            mode = compile_mode(self.hparams.compile)
            # all max_len words, with no early stop (the check would wait for the device and break the graph)
            self.sampler = compiled(partial(sample, check_every=0), mode)
            self.reward = compiled(self.cider.__call__, mode)

    def rewards(self, tokens, rows, k):
        image_of = torch.arange(len(rows), device=tokens.device).repeat_interleave(k)
        return self.reward(tokens, self.references[rows.to(self.references.device)].to(tokens.device), image_of)

    def training_step(self, batch, batch_idx):
        features, rows = batch[0], batch[-1]
        s = self.settings()
        k = int(s["samples"])
        repeated = features.repeat_interleave(k, 0)  # k captions per image, image-major (rows i*k .. i*k+k-1)
        tokens = self.sampler(self.model, repeated, int(s["max_len"]))  # without autograd
        rewards = self.rewards(tokens, rows, k)
        greedy = None
        if s["baseline"] == "greedy":
            self.model.eval()  # the test-time caption: no dropout
            greedy_tokens = beam_search(self.model, features, beam_size=1, max_len=int(s["max_len"]))[0][:, 0]
            self.model.train()
            # padded to max_len (which leaves CIDEr-D as it is): one shape for a compiled reward, not one per length
            greedy_tokens = F.pad(greedy_tokens, (0, int(s["max_len"]) - greedy_tokens.shape[1]), value=PAD)
            greedy = self.rewards(greedy_tokens, rows, 1)
        baseline = baseline_of(rewards, k, s["baseline"], greedy)
        loss = policy_loss(-caption_nll(self.model, repeated, tokens), tokens, rewards - baseline)
        self.log("train/loss", loss)
        self.log("train/reward", rewards.mean().float())  # shown by monitor.LossProgressBar
        self.log("train/reward_baseline", baseline.mean().float())
        return loss
