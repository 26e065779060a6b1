"""Show, Attend and Tell (Xu et al., 2015, arXiv 1502.03044), soft attention: an LSTM that looks at the grid of
image vectors [B, N, D] anew at each word.

The mean grid vector initialises h and c (Linear + tanh each). At each word, an additive (Bahdanau) attention over
the grid, from the previous h, gives the weights alpha [B, N]; their weighted sum of the grid, gated by
beta = sigmoid(Linear(h)), is the context. The LSTMCell takes [word vector; context]; dropout, then a Linear over
the vocabulary from h. The grid's attention projection is computed once per image (initial_state) and kept in the
state, so a decoding step costs O(N * attention_dim). Training adds the doubly stochastic regulariser
(`attention_reg`, the paper's lambda) through CaptionModel.aux_loss.
"""
import torch
from torch import nn

from captioner.data.vocab import PAD
from captioner.models.base import CaptionModel, register_model
from captioner.models.layers import WordEmbedding


def attention_penalty(alpha, real, weight: float = 1.0):
    """The doubly stochastic regulariser: weight * the mean over images and grid vectors n of (1 - sum_t alpha_tn)^2,
    the sum over t running over the real (non-pad) steps only. alpha [B, T, N], real [B, T] bool.

    A mean over the grid, as sgrvinod's tutorial takes it, not the paper's sum: beside a cross-entropy per word (~3),
    a sum over 49 vectors (~28 for 12 words) outweighs it, and on Flickr8k it drove every word's attention to
    uniform (entropy 3.88 of 3.89 nats)."""
    total = (alpha * real[..., None]).sum(1)  # [B, N]: the attention each grid vector got over the caption
    return weight * ((1 - total) ** 2).mean()


@register_model("show_attend_tell")
class ShowAttendTell(CaptionModel):
    feature_kind = "grid"
    state_batch_dim = 0  # state: (h [B, H], c [B, H], grid [B, N, D], its attention projection [B, N, A])

    def __init__(self, feature_dim: int, vocab_size: int, embedding: WordEmbedding, hidden_size: int = 512,
                 attention_dim: int = 512, dropout: float = 0.0, attention_reg: float = 1.0):
        super().__init__()
        self.attention_reg = float(attention_reg)
        self.embed = embedding
        self.init_h = nn.Linear(feature_dim, hidden_size)
        self.init_c = nn.Linear(feature_dim, hidden_size)
        self.att_grid = nn.Linear(feature_dim, attention_dim)
        self.att_hidden = nn.Linear(hidden_size, attention_dim)
        self.att_score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_size, 1)  # beta: how much of the image the next word needs
        self.cell = nn.LSTMCell(embedding.weight.shape[1] + feature_dim, hidden_size)
        self.drop = nn.Dropout(dropout)  # before the output layer (training only)
        self.out = nn.Linear(hidden_size, vocab_size)

    def initial_state(self, features):
        mean = features.mean(1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), features, self.att_grid(features)

    def _advance(self, x, state):
        """One word vector x [B, E] -> the new h [B, H], the new state and this step's alpha [B, N]."""
        h, c, grid, projected = state
        scores = self.att_score(torch.tanh(projected + self.att_hidden(h)[:, None])).squeeze(-1)
        alpha = scores.softmax(-1)
        context = torch.sigmoid(self.gate(h)) * torch.bmm(alpha[:, None], grid).squeeze(1)
        h, c = self.cell(torch.cat([x, context], -1), (h, c))
        return h, (h, c, grid, projected), alpha

    def _unroll(self, features, inputs, state=None):
        state = self.initial_state(features) if state is None else state
        x = self.embed(inputs)
        hs, alphas = [], []
        for t in range(inputs.shape[1]):
            h, state, alpha = self._advance(x[:, t], state)
            hs.append(h)
            alphas.append(alpha)
        return torch.stack(hs, 1), state, torch.stack(alphas, 1)

    def forward(self, features, inputs, state=None):
        hidden, state, alpha = self._unroll(features, inputs, state)
        self.aux_loss = attention_penalty(alpha, inputs != PAD, self.attention_reg) \
            if self.training and self.attention_reg else None
        return self.drop(hidden), state

    def step(self, words, state):
        h, state, _ = self._advance(self.embed(words), state)
        return self.out(self.drop(h)), state

    def attention_maps(self, features, inputs):
        return self._unroll(features, inputs)[2]
