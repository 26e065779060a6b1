"""Decoding captions from image features: batched beam search (beam_size=1 is greedy) and sampling.

Every image of the batch and every beam advance together as one (batch * beam) RNN step; there is no Python
loop over images, no per-word host sync (the early-stop check runs every few steps), no allocation that grows
with the caption, and no pass over a [batch, beam * vocabulary] tensor beyond the log-softmax itself.
"""
import torch
import torch.nn.functional as F

from captioner.models.base import CaptionModel
from captioner.data.vocab import END, PAD, START, UNK

NEG = -1e9
DECODE_KEYS = ("beam_size", "max_len", "n_best", "length_penalty", "no_repeat_ngram_size", "temperature", "top_k",
               "seed")


def _mask_specials(logp):
    logp[:, PAD:START + 1] = NEG  # <pad> and <start> are never emitted by a live caption (PAD, START = 0, 1)
    # nor <unk>: it tells a reader nothing, and in SCST it would be rewarded for matching the references' <unk>
    logp[:, UNK] = NEG
    return logp


def block_repeats(logp, history, n):
    """Sets to NEG, in place, the scores [N, V] of every word that would complete an n-gram already in its row of
    `history` [N, t] (the words so far), as no_repeat_ngram_size does in HF transformers and fairseq. One unfold
    over the t - n + 1 n-grams of all rows at once; no loop over rows."""
    if n <= 0 or history.shape[1] < n:
        return logp
    grams = history.unfold(1, n, 1)  # [N, t - n + 1, n]
    seen = (grams[..., :-1] == history[:, None, history.shape[1] - n + 1:]).all(-1)  # starts as the row ends
    # an n-gram whose first n - 1 words are not the row's last ones bans nothing: it points at <pad>, which
    # is NEG already, so every write is NEG and repeated indices cannot conflict
    return logp.scatter_(1, torch.where(seen, grams[..., -1], PAD), NEG)


def _step(model: CaptionModel, words, state):
    logits, state = model.step(words, state)
    # one pass: fp32 log-probabilities straight from (possibly bf16) logits, no separate .float() copy
    return _mask_specials(F.log_softmax(logits, -1, dtype=torch.float32)), state


@torch.no_grad()
def beam_search(model: CaptionModel, features, beam_size=3, max_len=20, length_penalty=0.0, n_best=1,
                check_every=4, no_repeat_ngram_size=0):
    """Returns (tokens [B, n_best, T], log-probabilities [B, n_best], probabilities over the returned set).

    Ranking uses log p / ((5 + length) / 6) ** length_penalty (GNMT), each caption with its own length (its words
    and <end>); 0 ranks by plain log-probability. no_repeat_ngram_size=n > 0: no caption holds an n-gram twice.

    Speed: the best k words of each beam are found first (a top-k per row of [B * k, V]), then the best k of
    those k * k candidates per image; the global top-k can hold at most k words of one beam, so this is exact,
    and no [B, k * V] candidate tensor is ever written. Each step writes its words and back-pointers into
    preallocated [max_len, B, k] buffers; the sequences are read back once at the end.
    """
    B, k = features.shape[0], min(beam_size, model.vocab_size)  # no more beams than words
    n_best = min(n_best, k)
    device = features.device
    state = model.repeat_state(model.initial_state(features), k)
    scores = torch.full((B, k), NEG, device=device)
    scores[:, 0] = 0.0  # one live beam at the first step, so the first words of the beams differ
    words = torch.full((B * k,), START, device=device, dtype=torch.long)
    tokens = torch.zeros(max_len, B, k, dtype=torch.long, device=device)
    origins = torch.zeros(max_len, B, k, dtype=torch.long, device=device)
    done = torch.zeros(B, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, k, dtype=torch.long, device=device)
    offsets = (torch.arange(B, device=device) * k)[:, None]
    # a finished beam continues only with <pad>, at no cost, so it keeps its score and its place
    pad_only = torch.full((B, k, k), NEG, device=device)
    pad_only[..., 0] = 0.0
    pad_word = torch.full((B, k, k), PAD, dtype=torch.long, device=device)
    # no_repeat_ngram_size: each beam's words so far, reordered with the beams (the back-pointers hold them too,
    # but rebuilding every beam's caption from them each step would take a loop over t)
    history = torch.zeros(B, k, max_len, dtype=torch.long, device=device) if no_repeat_ngram_size > 0 else None
    steps = max_len
    for t in range(max_len):
        logp, state = _step(model, words, state)
        if history is not None:
            block_repeats(logp, history[..., :t].reshape(B * k, t), no_repeat_ngram_size)
        best, word = logp.topk(k, -1)  # [B * k, k]
        best = torch.where(done[..., None], pad_only, best.view(B, k, k))
        word = torch.where(done[..., None], pad_word, word.view(B, k, k))
        scores, flat = (scores[..., None] + best).view(B, -1).topk(k, -1)
        origin = flat // k
        words = word.view(B, -1).gather(1, flat)
        state = model.reorder_state(state, (origin + offsets).view(-1))
        tokens[t], origins[t] = words, origin
        if history is not None:
            history = history.gather(1, origin[..., None].expand_as(history))
            history[..., t] = words
        was_done = done.gather(1, origin)
        lengths = lengths.gather(1, origin) + ~was_done
        done = was_done | (words == END)
        words = words.view(-1)
        if (t + 1) % check_every == 0 and bool(done.all()):
            steps = t + 1
            break
    rank = scores / ((5.0 + lengths.float()) / 6.0) ** length_penalty if length_penalty else scores
    order = rank.argsort(-1, descending=True)[:, :n_best]
    best_scores = scores.gather(1, order)
    # follow the back-pointers from the chosen beams to the first word
    best_tokens = torch.empty(B, n_best, steps, dtype=torch.long, device=device)
    beam = order
    for t in range(steps - 1, -1, -1):
        best_tokens[:, :, t] = tokens[t].gather(1, beam)
        beam = origins[t].gather(1, beam)
    return best_tokens, best_scores, best_scores.softmax(-1)


def draw(logits, generator=None):
    """One categorical draw per row of logits [N, V] -> word ids [N], by inverting the cumulative distribution: one
    uniform number per row (torch.multinomial has a slow CPU path; a Gumbel-max draw needs one number per word)."""
    cdf = logits.softmax(-1, dtype=torch.float32).cumsum_(-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample(model: CaptionModel, features, max_len=20, temperature=1.0, top_k=0, generator=None, check_every=4,
           no_repeat_ngram_size=0):
    """Ancestral sampling (the seed's `probabilistic`; SCST's samples): tokens [B, T], <pad> after <end>, T <=
    max_len. All B captions advance together; whether all have ended is checked (a host sync) every `check_every`
    words only (0: never). no_repeat_ngram_size=n > 0: no caption holds an n-gram twice."""
    B = features.shape[0]
    state = model.initial_state(features)
    words = torch.full((B,), START, device=features.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    out = []
    for t in range(max_len):
        logits, state = model.step(words, state)
        logits = _mask_specials(logits)  # in place (no autograd here); draw's softmax normalises: no log_softmax
        if no_repeat_ngram_size > 0 and out:
            block_repeats(logits, torch.stack(out, 1), no_repeat_ngram_size)  # before top_k, as beam search does
        if temperature != 1.0:
            logits = logits.float() / max(temperature, 1e-6)  # fp32: bf16 logits would round after dividing
        if 0 < top_k < logits.shape[-1]:  # a top_k of the vocabulary's size or more keeps every word
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, NEG)
        words = torch.where(done, PAD, draw(logits, generator))
        out.append(words)
        done |= words == END
        if check_every and (t + 1) % check_every == 0 and bool(done.all()):
            break
    return torch.stack(out, 1)


def decode_options(cfg) -> dict:
    """The decoding keys of a command's config (conf/decode/ plus its sampling `seed`)."""
    return {k: cfg[k] for k in DECODE_KEYS if k in cfg}


@torch.no_grad()
def captions(model: CaptionModel, vocab, features, beam_size=3, max_len=20, n_best=1, length_penalty=0.0,
             temperature=None, top_k=0, seed=None, no_repeat_ngram_size=2):
    """Features [B, dim] (grid models: [B, N, dim]) -> one list of (caption, probability) per image, probabilities
    normalised over that list; with `temperature` set, one sampled caption per image instead of beam search. The
    defaults are conf/decode/beam.yaml's, so the Python API captions as the commands do."""
    if temperature is not None:
        g = torch.Generator(features.device).manual_seed(seed) if seed is not None else None
        tokens = sample(model, features, max_len, temperature, top_k, g, no_repeat_ngram_size=no_repeat_ngram_size)
        return [[(vocab.decode(t), 1.0)] for t in tokens.tolist()]
    tokens, _, probs = beam_search(model, features, beam_size, max_len, length_penalty, n_best,
                                   no_repeat_ngram_size=no_repeat_ngram_size)
    return [[(vocab.decode(t), p) for t, p in zip(ts, ps)] for ts, ps in zip(tokens.tolist(), probs.tolist())]
