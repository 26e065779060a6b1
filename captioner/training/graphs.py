"""`compile=graphs`: the training loss's forward and backward replayed as CUDA graphs, one launch each.

A GPU step of this small model is bound by the host: issuing its ~190 kernels one by one takes longer than the GPU
needs to run them. torch.cuda.make_graphed_callables captures the loss's forward and backward once per batch shape
and replays them after that. The optimizer, gradient clipping, accumulation, schedulers and the rest of Lightning's
loop stay as they are. Batches come in few shapes: their length padded to a multiple of 8 and their real positions
to few counts (CaptionDataModule's pad_to and pad_real). Off a GPU, the loss runs as it is, on the same batches.
"""
import logging

import torch
from torch import nn

from captioner.utils import CaptionerError

log = logging.getLogger("captioner")
MAX_GRAPHS = 32  # batch shapes past this many run eagerly (every graph keeps its inputs and outputs)


def autocast_state() -> tuple:
    """CUDA autocast on or off, and its dtype: a graph replays the precision it was captured in."""
    try:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except (TypeError, AttributeError):  # torch < 2.4
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class _Loss(nn.Module):
    """The loss as make_graphed_callables takes it: a module of tensors, whose parameters are the model's."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, features, inputs, targets, real):
        return self.loss((features, inputs, targets, real))[0]


class StepGraphs:
    """loss(batch) -> the mean cross-entropy, from a graph captured for the batch's shapes (on the first batch of
    each shape) and replayed since; its backward replays the backward graph. All graphs share one memory pool:
    a step runs one forward and then its backward, so no two graphs' work overlaps."""

    def __init__(self, model: nn.Module, loss):
        self.model, self.loss = model, loss
        self.graphs, self.pool = {}, None
        self.rows = 0  # the most rows a batch has had: smaller ones run eagerly
        self.accumulate = False  # gradients add up over several batches (set from the Trainer)
        self.told = False

    def __call__(self, batch):
        if batch[0].device.type != "cuda":
            if not self.told:
                log.info("compile=graphs: no CUDA device, so the training step runs as it is.")
                self.told = True
            return self.loss(batch)[0]
        if len(batch) < 4:  # no real positions: not a CaptionBatches batch, whose shapes the graphs are for
            return self.loss(batch)[0]
        self.rows = max(self.rows, len(batch[0]))
        if len(batch[0]) < self.rows:  # an epoch's last, smaller batch: its shapes change from epoch to epoch
            return self.loss(batch)[0]
        key = (*(tuple(t.shape) for t in batch), autocast_state())
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return self.loss(batch)[0]
            graphed = self.graphs[key] = self.capture(batch)
            log.info("Captured the training step as CUDA graph %d, for batches of shape %s.", len(self.graphs),
                     [tuple(t.shape) for t in batch])
        if self.accumulate:
            self.own_gradients()
        return graphed(*batch)

    def capture(self, batch):
        # make_graphed_callables refuses autocast's weight cache (a graph must not keep the casts of a step)
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            sample = tuple(t.clone() for t in batch)  # the graph's own inputs; each batch is copied into them
            return torch.cuda.make_graphed_callables(_Loss(self.model, self.loss), sample, allow_unused_input=True,
                                                     pool=self.pool)
        except Exception as e:  # a failed capture can leave CUDA unusable: stop with the reason, not a retry
            raise CaptionerError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); train with compile=false.") from e
        finally:
            torch.set_autocast_cache_enabled(cache)

    def own_gradients(self):
        """A gradient that autograd took over from a graph's output buffer (it does when .grad is None) is copied
        out before the next replay, which would overwrite it while gradients add up. Without accumulation, .grad is
        consumed by the optimizer and reset before the next backward."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()
