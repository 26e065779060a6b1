"""Decoding captions from image features: batched beam search (beam_size=1 is greedy) and sampling.

Every image of the batch and every beam advance together as one (batch * beam) RNN step; there is no Python
loop over images and no per-word host sync (the early-stop check runs every few steps).
"""
import torch
import torch.nn.functional as F

from captioner.model import ShowAndTell
from captioner.vocab import END, PAD, START

NEG = -1e9
DECODE_KEYS = ("beam_size", "max_len", "n_best", "length_penalty", "temperature", "top_k", "seed")


def _reorder(state, index):
    if isinstance(state, tuple):
        return tuple(s[:, index] for s in state)
    return state[:, index]


def _repeat(state, k):
    if isinstance(state, tuple):
        return tuple(s.repeat_interleave(k, 1) for s in state)
    return state.repeat_interleave(k, 1)


def _step(model: ShowAndTell, words, state):
    logits, state = model.step(words, state)
    logp = F.log_softmax(logits.float(), -1)
    logp[:, PAD] = NEG  # never emitted by a live caption
    logp[:, START] = NEG
    return logp, state


@torch.no_grad()
def beam_search(model: ShowAndTell, features, beam_size=3, max_len=20, length_penalty=0.0, n_best=1,
                check_every=4):
    """Returns (tokens [B, n_best, T], log-probabilities [B, n_best], probabilities over the returned set).

    Ranking uses log p / ((5 + length) / 6) ** length_penalty (GNMT); 0 ranks by plain log-probability.
    """
    B, k = features.shape[0], beam_size
    n_best = min(n_best, k)
    device = features.device
    state = _repeat(model.initial_state(features), k)
    scores = torch.full((B, k), NEG, device=device)
    scores[:, 0] = 0.0  # one live beam at the first step, so the first words of the beams differ
    words = torch.full((B * k,), START, device=device, dtype=torch.long)
    seqs = torch.zeros(B, k, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, k, dtype=torch.long, device=device)
    offsets = (torch.arange(B, device=device) * k)[:, None]
    for t in range(max_len):
        logp, state = _step(model, words, state)
        logp = logp.view(B, k, -1)
        # a finished beam continues only with <pad>, at no cost, so it keeps its score and its place
        logp = torch.where(done[..., None], torch.full_like(logp, NEG), logp)
        logp[..., PAD] = torch.where(done, 0.0, NEG)
        V = logp.shape[-1]
        scores, flat = (scores[..., None] + logp).view(B, -1).topk(k, -1)
        origin, words = flat // V, flat % V
        index = (origin + offsets).view(-1)
        state = _reorder(state, index)
        seqs = torch.cat([seqs.gather(1, origin[..., None].expand(-1, -1, seqs.shape[2])), words[..., None]], 2)
        was_done = done.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~was_done).long()
        done = was_done | (words == END)
        words = words.view(-1)
        if (t + 1) % check_every == 0 and bool(done.all()):
            break
    rank = scores / ((5.0 + lengths.float()) / 6.0) ** length_penalty if length_penalty else scores
    order = rank.argsort(-1, descending=True)[:, :n_best]
    best_tokens = seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[2]))
    best_scores = scores.gather(1, order)
    return best_tokens, best_scores, best_scores.softmax(-1)


@torch.no_grad()
def sample(model: ShowAndTell, features, max_len=20, temperature=1.0, top_k=0, generator=None):
    """Ancestral sampling (the seed's `probabilistic`): tokens [B, T] and their log-probabilities [B]."""
    B = features.shape[0]
    state = model.initial_state(features)
    words = torch.full((B,), START, device=features.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    total = torch.zeros(B, device=features.device)
    out = []
    for _ in range(max_len):
        logp, state = _step(model, words, state)
        logits = logp / max(temperature, 1e-6)
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG)
        probs = logits.softmax(-1)
        words = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        words = torch.where(done, torch.full_like(words, PAD), words)
        total += torch.where(done, 0.0, logp.gather(1, words[:, None]).squeeze(1))
        out.append(words)
        done |= words == END
    return torch.stack(out, 1), total


def decode_options(cfg) -> dict:
    """The decoding keys of a command's config (conf/decode/ plus its sampling `seed`)."""
    return {k: cfg[k] for k in DECODE_KEYS if k in cfg}


@torch.no_grad()
def captions(model: ShowAndTell, vocab, features, beam_size=3, max_len=20, n_best=1, length_penalty=0.0,
             temperature=None, top_k=0, seed=None):
    """Features [B, dim] -> one list of (caption, probability) per image, probabilities normalised over that
    list; with `temperature` set, one sampled caption per image instead of beam search."""
    if temperature is not None:
        g = torch.Generator(features.device).manual_seed(seed) if seed is not None else None
        tokens, _ = sample(model, features, max_len, temperature, top_k, g)
        return [[(vocab.decode(t), 1.0)] for t in tokens.tolist()]
    tokens, _, probs = beam_search(model, features, beam_size, max_len, length_penalty, n_best)
    return [[(vocab.decode(t), p) for t, p in zip(ts, ps)] for ts, ps in zip(tokens.tolist(), probs.tolist())]
