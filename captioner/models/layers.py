"""Layers shared by captioning models."""
import torch
import torch.nn.functional as F
from torch import nn


class WordEmbedding(nn.Module):
    """Word vectors, optionally initialised from a pretrained matrix.

    With `freeze`, rows that have a pretrained vector (`has_vector`) stay fixed and only the others (special
    tokens, words without a vector) are learned; without it, every row is fine-tuned.
    """

    def __init__(self, num_words: int, dim: int, freeze=False, pretrained=None, has_vector=None):
        super().__init__()
        self.frozen = freeze
        weight = torch.randn(num_words, dim) * (0.1 if pretrained is None else float(pretrained.std()))
        has_vector = torch.zeros(num_words, dtype=torch.bool) if has_vector is None else has_vector
        self.register_buffer("has_vector", has_vector.bool())
        self.register_buffer("pretrained", torch.zeros(num_words, dim) if pretrained is None else pretrained.float())
        # torch.where, not a masked assignment: no data-dependent shape, so it also builds on the meta device
        self.weight = nn.Parameter(torch.where(self.has_vector[:, None], self.pretrained, weight))

    def table(self) -> torch.Tensor:
        if self.frozen:
            return torch.where(self.has_vector[:, None], self.pretrained, self.weight)
        return self.weight

    def forward(self, ids):
        return F.embedding(ids, self.table())
