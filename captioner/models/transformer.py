"""A Transformer decoder over the image's grid vectors (pre-LN; Vaswani et al., 2017): causal self-attention over the
words so far, cross-attention over the feature map's N vectors, a feed-forward layer; next-word scores out.

Decoding keeps, per layer, the keys and values of the grid (computed once in initial_state) and of every word so far
(one new position appended per step), so a beam step costs one position, not a rerun of the prefix. The state is a
tuple of batch-first tensors [B, heads, length, head_dim]; the position is the self-attention cache's length.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import CaptionModel, register_model
from captioner.models.layers import WordEmbedding
from captioner.utils import CaptionerError

POSITIONS = ("sinusoidal", "learned")


def sinusoids(positions, dim: int):
    """Positions [T] -> the fixed sin/cos encodings [T, dim] (sines in the first half, cosines in the second)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)[:, :dim]


class Block(nn.Module):
    """Self-attention, cross-attention, feed-forward; each on the LayerNorm of its input, added back (pre-LN)."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = num_heads, dropout
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.self_out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.q, self.kv, self.cross_out = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model), \
            nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def split(self, x):  # [B, T, d] -> [B, heads, T, d / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q, k, v, out, mask=None, causal=False):
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.drop(out(y.transpose(1, 2).flatten(2)))

    def memory(self, memory):
        """The grid's cross-attention keys and values, each [B, heads, N, d / heads]: once per image."""
        return tuple(self.split(t) for t in self.kv(memory).chunk(2, -1))

    def forward(self, x, cross_k, cross_v, k, v, maps=False):
        """x [B, T, d] at positions t0 .. t0 + T - 1, after cached keys/values k, v [B, heads, t0, d / heads]."""
        t0, T = k.shape[2], x.shape[1]
        q, k_new, v_new = (self.split(t) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        k, v = torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)
        # one new position sees everything cached; a block after a cache needs an explicit causal mask
        mask = torch.ones(T, t0 + T, dtype=torch.bool, device=x.device).tril(t0) if t0 and T > 1 else None
        x = x + self.attend(q, k, v, self.self_out, mask, causal=t0 == 0 and T > 1)
        q = self.split(self.q(self.ln2(x)))
        x = x + self.attend(q, cross_k, cross_v, self.cross_out)
        x = x + self.drop(self.ff(self.ln3(x)))
        # the cross-attention weights averaged over heads [B, T, N], for attention maps
        w = (q @ cross_k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1) if maps else None
        return x, k, v, w


@register_model("transformer")
class Transformer(CaptionModel):
    feature_kind = "grid"
    state_batch_dim = 0

    def __init__(self, feature_dim: int, vocab_size: int, embedding: WordEmbedding, num_layers: int = 3,
                 d_model: int = 512, num_heads: int = 8, ff_dim: int = 2048, dropout: float = 0.0,
                 positions: str = "sinusoidal", max_positions: int = 64):
        super().__init__()
        if positions not in POSITIONS:
            raise CaptionerError(f"model.positions={positions} is not one of {', '.join(POSITIONS)}.")
        if d_model % num_heads:
            raise CaptionerError(f"model.d_model={d_model} is not a multiple of model.num_heads={num_heads}.")
        self.d_model, self.heads, self.max_positions = d_model, num_heads, max_positions
        self.embed = embedding
        dim = embedding.weight.shape[1]  # e.g. GloVe's 50 dimensions, projected to d_model
        self.word_proj = nn.Linear(dim, d_model, bias=False) if dim != d_model else nn.Identity()
        self.pos = nn.Embedding(max_positions, d_model) if positions == "learned" else None
        self.grid_proj = nn.Sequential(nn.Linear(feature_dim, d_model), nn.ReLU(), nn.LayerNorm(d_model))
        self.blocks = nn.ModuleList(Block(d_model, num_heads, ff_dim, dropout) for _ in range(num_layers))
        self.ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    def initial_state(self, features):
        """Grid features [B, N, D] -> per layer: the grid's keys and values and the (empty) word keys and values."""
        if features.dim() != 3:
            raise CaptionerError(f"model=transformer takes grid features [batch, grid vectors, dim]; it was given a "
                                 f"tensor of shape {list(features.shape)}.")
        memory = self.grid_proj(features)
        empty = memory.new_zeros(len(memory), self.heads, 0, self.d_model // self.heads)
        return tuple(t for block in self.blocks for t in (*block.memory(memory), empty, empty))

    def run(self, inputs, state, maps=False):
        """Words [B, T] after the state's cached positions -> hidden [B, T, d_model], the new state, the last
        layer's cross-attention weights (with `maps`)."""
        t0, T = state[2].shape[2], inputs.shape[1]
        if self.pos is not None and t0 + T > self.max_positions:
            raise CaptionerError(f"model=transformer with learned positions takes at most model.max_positions="
                                 f"{self.max_positions} words; it was given {t0 + T}.")
        where = torch.arange(t0, t0 + T, device=inputs.device)
        x = self.word_proj(self.embed(inputs)) + (self.pos(where) if self.pos is not None
                                                  else sinusoids(where, self.d_model))
        x, new, w = self.drop(x), [], None
        for i, block in enumerate(self.blocks):
            cross_k, cross_v, k, v = state[4 * i:4 * i + 4]
            x, k, v, w = block(x, cross_k, cross_v, k, v, maps and i == len(self.blocks) - 1)
            new += [cross_k, cross_v, k, v]
        return self.ln(x), tuple(new), w

    def forward(self, features, inputs, state=None):
        """Teacher forcing: all positions in one pass -> hidden [B, T, d_model] and the state after them."""
        hidden, state, _ = self.run(inputs, self.initial_state(features) if state is None else state)
        return hidden, state

    def step(self, words, state):
        """One new position: previous words [B] -> next-word logits [B, V] and the state with it cached."""
        hidden, state, _ = self.run(words[:, None], state)
        return self.out(hidden[:, -1]), state

    def attention_maps(self, features, inputs):
        return self.run(inputs, self.initial_state(features), maps=True)[2]
