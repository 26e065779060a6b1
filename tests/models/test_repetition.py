"""no_repeat_ngram_size and the GNMT length penalty, on hand-worked beams of a fixed bigram model, and through the
commands. Vocabulary: <pad> <start> <end> <unk> a the cat (ids 0-6)."""
import contextlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.caption import main as caption_main
from captioner.evaluate import main as evaluate_main
from captioner.models.base import CaptionModel
from captioner.data.vocab import END, PAD, START, UNK
from captioner.models.decoding import NEG, beam_search, block_repeats, sample
from captioner.models.show_and_tell import ShowAndTell, WordEmbedding

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "the", "cat"]
ID = {w: i for i, w in enumerate(WORDS)}

# P(next word | previous word); unlisted words have probability 0
THE_CAT = {"<start>": {"the": .7, "a": .2, "cat": .05, "<end>": .05},
           "the": {"cat": .8, "a": .1, "<end>": .06, "the": .04},
           "cat": {"the": .6, "<end>": .3, "a": .05, "cat": .05},
           "a": {"cat": .5, "<end>": .3, "the": .1, "a": .1}}
A_A_A = {"<start>": {"a": .6, "cat": .3, "<end>": .1},
         "a": {"a": .7, "cat": .2, "<end>": .1},
         "cat": {"<end>": .6, "a": .3, "cat": .1}}


class Bigram(CaptionModel):
    """The model interface around a fixed table: step's logits are log P(next | previous word), whatever the image.
    The state is a dummy [1, B, 1] tensor, so the interface's reorder/repeat methods are the ones exercised."""

    def __init__(self, table):
        super().__init__()
        logp = torch.full((len(WORDS), len(WORDS)), -math.inf)
        for prev, row in table.items():
            for word, p in row.items():
                logp[ID[prev], ID[word]] = math.log(p)
        self.register_buffer("table", logp)

    @property
    def vocab_size(self):
        return len(WORDS)

    def initial_state(self, features):
        return features.new_zeros(1, len(features), 1)

    def step(self, words, state):
        return self.table[words], state


def run_beam(table, n, beam_size=2, max_len=4, n_best=1, length_penalty=0.0):
    tokens, scores, _ = beam_search(Bigram(table), torch.zeros(1, 3), beam_size, max_len, length_penalty, n_best,
                                    no_repeat_ngram_size=n)
    text = [" ".join(WORDS[t] for t in ts if t > 3) for ts in tokens[0].tolist()]
    return text, scores[0].tolist()


def test_bigram_blocking_on_a_hand_worked_beam():
    # beam 2, max_len 4, THE_CAT (products of the table's probabilities):
    # step 1: the .7, a .2
    # step 2: the cat .56, a cat .1 (the a .07 next)
    # step 3: the cat the .336, the cat <end> .168 (both from "the cat": the gather copies its words to both beams)
    # step 4, no blocking: the cat the cat .2688 > the cat <end> .168 (kept, finished) -> "the cat the cat"
    # step 4, n=2: "the cat the" may not take "cat" (the bigram "the cat" is in it): a .0336, <end> .02016, the
    #   .01344; the cat <end> .168 stays first -> "the cat", .168
    assert run_beam(THE_CAT, 0) == (["the cat the cat"], pytest.approx([math.log(.2688)], abs=1e-6))
    assert run_beam(THE_CAT, 2) == (["the cat"], pytest.approx([math.log(.168)], abs=1e-6))
    # n=3 allows "the cat the cat"'s repeated bigram (no trigram repeats in 4 words)
    assert run_beam(THE_CAT, 3)[0] == ["the cat the cat"]


def test_unigram_blocking_and_the_gnmt_length_penalty_on_a_hand_worked_beam():
    # beam 2, max_len 3, A_A_A, no blocking:
    # step 1: a .6, cat .3; step 2: a a .42, cat <end> .18; step 3: a a a .294, cat <end> .18 -> "a a a"
    assert run_beam(A_A_A, 0, max_len=3)[0] == ["a a a"]
    # n=1, every word once:
    # step 1: a .6, cat .3
    # step 2: "a" may not take a: a cat .12, a <end> .06; "cat" may not take cat: cat <end> .18, cat a .09
    #   -> cat <end> .18, a cat .12
    # step 3: cat <end> stays at .18; "a cat" may take neither a nor cat: a cat <end> .072
    expected = ["cat", "a cat"], pytest.approx([math.log(.18), math.log(.072)], abs=1e-6)
    assert run_beam(A_A_A, 1, max_len=3, n_best=2) == expected
    # GNMT: log p / ((5 + |Y|) / 6) ** alpha, |Y| each caption's own words and <end>: 2 for "cat", 3 for "a cat".
    # alpha 1: log .18 / (7/6) = -1.470 > log .072 / (8/6) = -1.973, the order stands.
    # alpha 4: log .18 / (7/6)**4 = -0.926 < log .072 / (8/6)**4 = -0.833: the longer caption comes first.
    # The scores returned stay plain log-probabilities.
    assert run_beam(A_A_A, 1, max_len=3, n_best=2, length_penalty=1.0) == expected
    assert run_beam(A_A_A, 1, max_len=3, n_best=2, length_penalty=4.0) == (expected[0][::-1],
                                                                            pytest.approx([math.log(.072),
                                                                                           math.log(.18)], abs=1e-6))


def repeated(row, n):
    words = row[:row.index(ID["<end>"]) + 1] if ID["<end>"] in row else row
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return [g for g, c in grams.items() if c > 1]


@pytest.mark.parametrize("top_k", [0, 3])
def test_sampling_never_repeats_a_bigram(top_k):
    """2,000 seeded draws of 12 words from THE_CAT: many repeat "the cat" without blocking, none with n=2."""
    model, feats = Bigram(THE_CAT), torch.zeros(2000, 3)
    draw = lambda n: sample(model, feats, 12, 1.0, top_k, torch.Generator().manual_seed(0),  # noqa: E731
                            no_repeat_ngram_size=n).tolist()
    assert sum(bool(repeated(row, 2)) for row in draw(0)) > 100
    assert not any(repeated(row, 2) for row in draw(2))


def test_block_repeats_bans_exactly_the_words_completing_a_seen_ngram():
    """Against a per-row Python reference, on random histories over a 6-word vocabulary."""
    g = torch.Generator().manual_seed(0)
    history = torch.randint(2, 6, (200, 9), generator=g)
    for n in (1, 2, 3):
        banned = block_repeats(torch.zeros(200, 6), history, n) < -1e8
        for row, ban in zip(history.tolist(), banned.tolist()):
            last = tuple(row[len(row) - n + 1:]) if n > 1 else ()
            expect = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == last}
            assert {w for w in range(2, 6) if ban[w]} == expect


@torch.no_grad()
def plain_blocked_beam_search(model, features, k, max_len, n):
    """The specification: a [B, k * V] top-k with each beam's words re-gathered every step, and the banned words
    found row by row in Python."""
    B = len(features)
    state = model.repeat_state(model.initial_state(features), k)
    scores = torch.full((B, k), NEG)
    scores[:, 0] = 0.0
    words, seqs = torch.full((B * k,), START), torch.zeros(B, k, 0, dtype=torch.long)
    done = torch.zeros(B, k, dtype=torch.bool)
    for _ in range(max_len):
        logits, state = model.step(words, state)
        logp = F.log_softmax(logits.float(), -1)
        logp[:, :START + 1] = NEG
        logp[:, UNK] = NEG  # never emitted
        for row, seq in enumerate(seqs.view(B * k, -1).tolist()):
            for i in range(len(seq) - n + 1):
                if seq[i:i + n - 1] == seq[len(seq) - n + 1:]:
                    logp[row, seq[i + n - 1]] = NEG
        logp = logp.view(B, k, -1)
        logp = torch.where(done[..., None], torch.full_like(logp, NEG), logp)
        logp[..., PAD] = torch.where(done, 0.0, logp[..., PAD])
        V = logp.shape[-1]
        scores, flat = (scores[..., None] + logp).view(B, -1).topk(k, -1)
        origin, words = flat // V, flat % V
        state = model.reorder_state(state, (origin + (torch.arange(B) * k)[:, None]).view(-1))
        seqs = torch.cat([seqs.gather(1, origin[..., None].expand(-1, -1, seqs.shape[2])), words[..., None]], 2)
        done = done.gather(1, origin) | (words == END)
        words = words.view(-1)
    return seqs[:, 0], scores[:, 0]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_batched_blocking_equals_the_plain_one(n):
    """A small random LSTM whose beams trade places: each beam's words must follow it (the history's reorder)."""
    torch.manual_seed(0)
    model = ShowAndTell(10, 12, WordEmbedding(12, 8), 32, 1, "lstm").eval()
    feats = torch.randn(32, 10) * 3
    expected, expected_scores = plain_blocked_beam_search(model, feats, 4, 10, n)
    tokens, scores, _ = beam_search(model, feats, 4, 10, no_repeat_ngram_size=n, check_every=11)
    assert torch.equal(tokens[:, 0], expected) and torch.allclose(scores[:, 0], expected_scores, atol=1e-5)
    assert not torch.equal(tokens, beam_search(model, feats, 4, 10, check_every=11)[0])  # blocking did something


def caption_cli(trained, *overrides):
    """Runs the caption command in this process -> its SystemExit message, or its captions' words."""
    image = sorted(Path(trained["cfg"].data.root, "val2017").glob("*.png"))[0]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            caption_main([str(image), f"ckpt_path={trained['ckpt']}", *overrides])
    except SystemExit as e:
        return str(e.code)
    return out.getvalue().split("\t")[-1].split()


@pytest.mark.parametrize("value", ["-1", "1.5", "two"])
def test_bad_values_get_one_sentence(trained, value):
    assert caption_cli(trained, f"no_repeat_ngram_size={value}") == \
        f"error: no_repeat_ngram_size={value} must be an integer from 0 to 1000."


@pytest.mark.slow
def test_caption_evaluate_and_serve_pass_it_on(trained, tmp_path, monkeypatch):
    """The smoke model (6 epochs) says "a picture of of": with n=1 the three commands drop the second "of"."""
    # without java (METEOR, PTB tokenizer: some 10 s a call): the decoding, not the metrics, is tested here
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(d) / "java").exists()))
    plain, blocked = caption_cli(trained), caption_cli(trained, "no_repeat_ngram_size=1")
    assert plain != blocked and len(set(blocked)) == len(blocked), (plain, blocked)

    evaluate_main([f"ckpt_path={trained['ckpt']}", "max_images=1", "spice=false", "no_repeat_ngram_size=1",
                   f"output_dir={tmp_path}"])
    results, = tmp_path.glob("*-nr1-results.json")  # its own file: not the n=0 run's
    assert json.loads(results.read_text())[0]["caption"].split() == blocked

    pytest.importorskip("fastapi", reason="serving needs fastapi")
    from fastapi.testclient import TestClient

    from captioner.cli import compose_config
    from captioner.serve import create_app
    from captioner.serving.inference import Captioner

    image = sorted(Path(trained["cfg"].data.root, "val2017").glob("*.png"))[0].read_bytes()
    with TestClient(create_app(Captioner(trained["ckpt"], "cpu"),
                               compose_config("serve", ["no_repeat_ngram_size=1"]))) as client:
        answer = client.post("/api/caption", files={"file": ("a.png", image, "image/png")}).json()
    assert answer["captions"][0]["caption"].split() == blocked


def test_unk_is_never_emitted_by_beam_search_or_sampling():
    """A table whose likeliest word is always <unk>: decoding takes the next best words instead."""
    unk = {"<start>": {"<unk>": .5, "the": .45, "<end>": .05}, "the": {"<unk>": .5, "cat": .45, "<end>": .05},
           "cat": {"<unk>": .3, "<end>": .7}}  # without <unk>: "the cat <end>" .142 beats "<end>" .05
    tokens, _, _ = beam_search(Bigram(unk), torch.zeros(1, 3), 2, 5)
    assert [WORDS[t] for t in tokens[0, 0].tolist() if t] == ["the", "cat", "<end>"]
    drawn = sample(Bigram(unk), torch.zeros(500, 3), 6, generator=torch.Generator().manual_seed(0))
    assert not (drawn == ID["<unk>"]).any() and (drawn == ID["cat"]).any()
