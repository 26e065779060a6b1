import pytest
import torch

from captioner.models.decoding import beam_search, sample
from captioner.models.show_and_tell import ShowAndTell, WordEmbedding
from captioner.data.vocab import END, PAD, START, UNK


def make_model(rnn_type="lstm", num_layers=1, vocab=12, feat=10, hidden=16, **emb):
    torch.manual_seed(0)
    return ShowAndTell(feat, vocab, WordEmbedding(vocab, 8, **emb), hidden, num_layers, rnn_type)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_features_set_the_initial_hidden_state_of_every_layer(rnn_type, num_layers):
    model = make_model(rnn_type, num_layers)
    f = torch.randn(3, 10)
    state = model.initial_state(f)
    h = state[0] if rnn_type == "lstm" else state
    assert h.shape == (num_layers, 3, 16)
    expected = torch.relu(model.init_hidden(f)).view(3, num_layers, 16).transpose(0, 1)
    assert torch.equal(h, expected)
    if rnn_type == "lstm":
        assert torch.count_nonzero(state[1]) == 0  # cell state starts at zero
    inputs = torch.tensor([[START, 5, 6], [START, 7, 8], [START, 4, 4]])
    out1, _ = model(f, inputs)
    out2, _ = model(f + 1.0, inputs)
    assert out1.shape == (3, 3, 16)
    assert not torch.allclose(out1, out2), "changing the image features must change the outputs"


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_the_compiled_decoding_step_is_the_teacher_forced_rnn_one_word_at_a_time(rnn_type, num_layers):
    """A compiled decoding step runs the RNN's weights through single-step cells (torch.lstm_cell, ...), as
    torch.compile cannot trace nn.LSTM; teacher forcing runs the sequence kernel. Word by word, they must agree,
    after a dtype round trip too (the cells must read the module's own, moved, weights)."""
    model = make_model(rnn_type, num_layers).double().float().eval()
    f, words = torch.randn(4, 10), torch.randint(1, 12, (4, 5))
    hidden, last = model(f, words)
    state = model.initial_state(f)
    for t in range(words.shape[1]):
        out, state = model.cell_step(model.embed(words[:, t]), state)
        torch.testing.assert_close(out, hidden[:, t], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(*((s if rnn_type == "lstm" else (s,)) for s in (state, last))):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_frozen_pretrained_rows_stay_fixed_and_others_learn():
    pretrained = torch.randn(12, 8)
    has = torch.zeros(12, dtype=torch.bool)
    has[4:8] = True
    for freeze in (True, False):
        model = make_model(freeze=freeze, pretrained=pretrained, has_vector=has)
        assert torch.equal(model.embed.table()[4:8], pretrained[4:8])
        opt = torch.optim.Adam(model.parameters(), 0.1)
        before = model.embed.table().detach().clone()
        ids = torch.arange(12)[None].repeat(2, 1)
        model(torch.randn(2, 10), ids)[0].sum().backward()
        opt.step()
        after = model.embed.table().detach()
        assert torch.equal(after[4:8], before[4:8]) == freeze
        assert not torch.equal(after[8:], before[8:]), "rows without a pretrained vector always learn"


def test_beam_search_greedy_matches_stepwise_argmax():
    model = make_model("gru").eval()
    f = torch.randn(4, 10)
    tokens, logp, probs = beam_search(model, f, beam_size=1, max_len=6)
    # reference: a plain loop taking the argmax word at every step (pad/start never emitted)
    state, word = model.initial_state(f), torch.full((4,), START)
    ref = []
    for _ in range(6):
        out, state = model(f, word[:, None], state)
        scores = torch.log_softmax(model.out(out[:, -1]), -1)
        scores[:, [PAD, START]] = -1e9
        word = scores.argmax(-1)
        ref.append(word)
    ref = torch.stack(ref, 1)
    for b in range(4):
        n = (ref[b] == END).nonzero()
        n = int(n[0]) + 1 if len(n) else 6
        assert tokens[b, 0, :n].tolist() == ref[b, :n].tolist()
    assert torch.allclose(probs, torch.ones_like(probs))


def test_beam_search_returns_distinct_ranked_captions_with_normalised_probabilities():
    model = make_model("lstm").eval()
    tokens, logp, probs = beam_search(model, torch.randn(5, 10), beam_size=4, max_len=8, n_best=3)
    assert tokens.shape[:2] == (5, 3) and probs.shape == (5, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    assert (logp[:, :-1] >= logp[:, 1:]).all()
    for b in range(5):
        seqs = {tuple(t.tolist()) for t in tokens[b]}
        assert len(seqs) == 3, "no duplicate beams"
    # wider beams never find a worse best caption
    _, best1, _ = beam_search(model, torch.randn(5, 10).mul(0).add(1), beam_size=1, max_len=8)
    _, best4, _ = beam_search(model, torch.randn(5, 10).mul(0).add(1), beam_size=4, max_len=8)
    assert (best4[:, 0] >= best1[:, 0] - 1e-5).all()


def test_sampling_is_seedable():
    model = make_model().eval()
    f = torch.randn(3, 10)
    a = sample(model, f, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = sample(model, f, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("temperature, top_k", [(0.5, 0), (2.0, 0), (1.0, 3), (0.7, 4)])
def test_temperature_and_top_k_shape_the_sampled_distribution(temperature, top_k):
    """The first word's draws follow softmax(logits / temperature) over the top_k most likely words only."""
    model = make_model().eval()
    with torch.no_grad():
        model.out.weight.mul_(8)  # a peaked distribution, so temperature and top_k visibly change it
    features = torch.randn(1, 10, generator=torch.Generator().manual_seed(2)).repeat(20000, 1)
    tokens = sample(model, features, 1, temperature, top_k, torch.Generator().manual_seed(0))[:, 0]
    with torch.no_grad():
        logits, _ = model.step(torch.full((1,), START), model.initial_state(features[:1]))
    logits[:, [PAD, START, UNK]] = float("-inf")
    if top_k:
        logits[logits < logits.topk(top_k).values[:, -1:]] = float("-inf")
    expected = (logits / temperature).softmax(-1)[0]
    observed = torch.bincount(tokens, minlength=len(expected)).float() / len(tokens)
    assert (observed - expected).abs().max() < 0.015
    assert set(tokens.unique().tolist()) <= set(expected.nonzero().view(-1).tolist())
    assert not top_k or len(tokens.unique()) == top_k


def test_loss_on_real_tokens_equals_padded_cross_entropy():
    """Computing the output layer on real positions only must not change the loss (the speed path)."""
    from captioner.training.module import CaptionModule

    torch.manual_seed(0)
    m = CaptionModule([f"w{i}" for i in range(12)], 10, preprocess={}, embeddings={"dim": 8}, hidden_size=16)
    feats = torch.randn(3, 10)
    targets = torch.tensor([[5, 6, 7, END], [8, END, PAD, PAD], [9, 9, END, PAD]])
    inputs = torch.cat([torch.full((3, 1), START), targets[:, :-1]], 1)
    inputs[inputs == END] = PAD
    real = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 10])  # the flat positions of the real targets
    loss, scored = m.loss((feats, inputs, targets, real))
    hidden, _ = m.model(feats, inputs)
    full = torch.nn.functional.cross_entropy(m.model.out(hidden).transpose(1, 2), targets, ignore_index=PAD)
    assert torch.equal(scored, targets.flatten()[real]) and torch.allclose(loss, full)
    fixed, scored = m.loss((feats, inputs, targets))  # no positions given (a compiled loss): every one, pads ignored
    assert int((scored != PAD).sum()) == 9 and torch.allclose(fixed, full)
