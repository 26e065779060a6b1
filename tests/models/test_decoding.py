"""The fast beam search (per-beam top-k, back-pointers in preallocated buffers) returns exactly what the
straightforward one does: the full [B, k * V] candidate top-k with the sequences re-gathered every step."""
import pytest
import torch
import torch.nn.functional as F

from captioner.models.decoding import NEG, beam_search, captions, sample
from captioner.models.show_and_tell import ShowAndTell, WordEmbedding
from captioner.data.vocab import END, PAD, START, UNK


@torch.no_grad()
def plain_beam_search(model, features, beam_size=3, max_len=20, length_penalty=0.0, n_best=1):
    """The previous implementation, kept here as the specification."""
    B, k = features.shape[0], beam_size
    state = model.initial_state(features)
    state = tuple(s.repeat_interleave(k, 1) for s in state) if isinstance(state, tuple) else \
        state.repeat_interleave(k, 1)
    scores = torch.full((B, k), NEG)
    scores[:, 0] = 0.0
    words = torch.full((B * k,), START, dtype=torch.long)
    seqs = torch.zeros(B, k, 0, dtype=torch.long)
    done = torch.zeros(B, k, dtype=torch.bool)
    lengths = torch.zeros(B, k, dtype=torch.long)
    offsets = (torch.arange(B) * k)[:, None]
    for _ in range(max_len):
        logits, state = model.step(words, state)
        logp = F.log_softmax(logits.float(), -1)
        logp[:, PAD] = NEG
        logp[:, START] = NEG
        logp[:, UNK] = NEG  # never emitted
        logp = logp.view(B, k, -1)
        logp = torch.where(done[..., None], torch.full_like(logp, NEG), logp)
        logp[..., PAD] = torch.where(done, 0.0, NEG)
        V = logp.shape[-1]
        scores, flat = (scores[..., None] + logp).view(B, -1).topk(k, -1)
        origin, words = flat // V, flat % V
        index = (origin + offsets).view(-1)
        state = tuple(s[:, index] for s in state) if isinstance(state, tuple) else state[:, index]
        seqs = torch.cat([seqs.gather(1, origin[..., None].expand(-1, -1, seqs.shape[2])), words[..., None]], 2)
        was_done = done.gather(1, origin)
        lengths = lengths.gather(1, origin) + (~was_done).long()
        done = was_done | (words == END)
        words = words.view(-1)
    rank = scores / ((5.0 + lengths.float()) / 6.0) ** length_penalty if length_penalty else scores
    order = rank.argsort(-1, descending=True)[:, :n_best]
    best = seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[2]))
    return best, scores.gather(1, order)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("beam_size, n_best, length_penalty", [(1, 1, 0.0), (3, 1, 0.0), (4, 3, 0.7)])
def test_fast_beam_search_equals_the_plain_one(rnn_type, beam_size, n_best, length_penalty):
    torch.manual_seed(1)
    vocab = 40
    model = ShowAndTell(10, vocab, WordEmbedding(vocab, 8), 32, 1, rnn_type).eval()
    with torch.no_grad():  # captions end at different lengths: finished beams must carry on correctly
        model.out.bias[END] += {"lstm": 0.2, "gru": 0.3}[rnn_type]
    feats = torch.randn(16, 10) * 3
    max_len = 12
    expected, expected_scores = plain_beam_search(model, feats, beam_size, max_len, length_penalty, n_best)
    # check_every > max_len: no early stop, the same number of steps as the plain loop
    tokens, scores, probs = beam_search(model, feats, beam_size, max_len, length_penalty, n_best,
                                        check_every=max_len + 1)
    ended = (tokens == END).any(-1)
    end_at = (tokens == END).float().argmax(-1)[ended]
    assert len(set(end_at.tolist())) >= 2, "the case must mix captions of different lengths"
    assert torch.equal(tokens, expected)
    assert torch.allclose(scores, expected_scores, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(16))
    # with the early stop, the same captions up to where every beam had ended
    early, early_scores, _ = beam_search(model, feats, beam_size, max_len, length_penalty, n_best, check_every=2)
    assert torch.equal(early, expected[..., :early.shape[-1]])
    assert torch.equal(early_scores, scores)


def test_a_beam_or_top_k_wider_than_the_vocabulary_keeps_every_word():
    """A tiny vocabulary (the smoke set has 20 words) with beam_size or top_k above its size: every word, not
    'selected index k out of range'."""
    torch.manual_seed(0)
    vocab = 6
    model = ShowAndTell(10, vocab, WordEmbedding(vocab, 8), 16, 1, "lstm").eval()
    feats = torch.randn(3, 10)
    tokens, scores, _ = beam_search(model, feats, beam_size=30, max_len=5, n_best=30)
    same, same_scores, _ = beam_search(model, feats, beam_size=vocab, max_len=5, n_best=vocab)
    assert torch.equal(tokens, same) and torch.equal(scores, same_scores)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample(model, feats, 8, 1.0, 50, g()), sample(model, feats, 8, 1.0, 0, g()))


def test_validation_captions_decode_as_the_decode_group_says(cfg_factory, trained):
    """decode=sample (and temperature, top_k) apply to the val/CIDEr captions of training too, seeded by the run's
    seed; beam search otherwise."""
    from captioner.serving.inference import Captioner
    from captioner.training.monitor import CaptionMonitor
    from captioner.run import build_callbacks

    monitor = lambda *o: next(c for c in build_callbacks(cfg_factory(*o), False)  # noqa: E731
                              if isinstance(c, CaptionMonitor))
    assert monitor().decode == dict(beam_size=3, max_len=20, length_penalty=0.0, temperature=None, top_k=0, seed=0,
                                   no_repeat_ngram_size=2)
    sampled = monitor("decode=sample", "top_k=3", "seed=7", "no_repeat_ngram_size=0").decode
    assert (sampled["temperature"], sampled["top_k"], sampled["seed"]) == (1.0, 3, 7)
    assert sampled["no_repeat_ngram_size"] == 0
    captioner = Captioner(trained["ckpt"], "cpu")
    feats = torch.randn(4, captioner.model.init_hidden.in_features, generator=torch.Generator().manual_seed(0))
    first = captions(captioner.model, captioner.vocab, feats, **sampled)
    assert first == captions(captioner.model, captioner.vocab, feats, **sampled)  # seeded: the same every epoch
    assert first != captions(captioner.model, captioner.vocab, feats, **{**sampled, "seed": 8})
