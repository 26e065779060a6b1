"""model=transformer on grid features [B, N, D]: cached one-position decoding agrees with the teacher-forced pass,
beam search and sampling run with it, attention maps, the checkpoint round trip, and its one-sentence errors."""
import re

import pytest
import torch
from omegaconf import OmegaConf

from captioner.checkpoint import load_checkpoint
from captioner.data.vocab import END, PAD, START
from captioner.models import WordEmbedding, build_model, check_model, load_model
from captioner.models.decoding import beam_search, sample
from captioner.models.show_and_tell import ShowAndTell
from captioner.training.module import CaptionModule
from captioner.utils import CaptionerError

V, N, D = 20, 5, 12
SMALL = dict(num_layers=2, d_model=32, num_heads=4, ff_dim=64)


def make(emb_dim=8, **args):
    torch.manual_seed(0)
    return build_model("transformer", D, V, WordEmbedding(V, emb_dim), **{**SMALL, **args}).eval()


@pytest.mark.parametrize("positions,emb_dim", [("sinusoidal", 8), ("learned", 32)])  # 32: no word projection
def test_cached_steps_give_the_teacher_forced_logits_across_a_beam_reorder(positions, emb_dim):
    model, k, T = make(emb_dim, positions=positions), 3, 7
    f = torch.randn(2, N, D)
    words = torch.randint(3, V, (2 * k, T))
    words[:, 0] = START
    state = model.repeat_state(model.initial_state(f), k)
    index = torch.tensor([2, 0, 0, 5, 3, 4])  # beams of image 0 then image 1, one copied, as beam search does
    history = words.clone()
    for t in range(T):
        if t == 3:
            state = model.reorder_state(state, index)
            history[:, :t] = history[index, :t]  # each row now continues the prefix it was given
        logits, state = model.step(history[:, t], state)
        hidden, _ = model(f.repeat_interleave(k, 0), history[:, :t + 1])  # from scratch: no cache
        torch.testing.assert_close(logits, model.logits(hidden[:, -1]), atol=1e-5, rtol=0)
    assert state[2].shape == (2 * k, 4, T, 8)  # one cached key per position: the state is batch-first
    # the teacher-forced pass continues from its own state too: a block of words after a cached prefix
    whole, _ = model(f, words[:2])
    start, state = model(f, words[:2, :3])
    rest, _ = model(f, words[:2, 3:], state)
    torch.testing.assert_close(torch.cat([start, rest], 1), whole, atol=1e-5, rtol=0)


def test_greedy_beam_search_is_the_teacher_forced_argmax_and_beams_of_three_block_repeats():
    model, f = make(), torch.randn(3, N, D)
    tokens = beam_search(model, f, beam_size=1, max_len=8)[0][:, 0]
    prefix = torch.full((3, 1), START)
    for t in range(tokens.shape[1]):
        scores = model.logits(model(f, prefix)[0][:, -1])
        scores[:, PAD:START + 1] = -1e9
        live = (prefix[:, 1:] != END).all(1) if t else torch.ones(3, dtype=torch.bool)
        assert torch.equal(tokens[live, t], scores.argmax(-1)[live])
        prefix = torch.cat([prefix, tokens[:, t:t + 1]], 1)

    model.out.bias.data[7] += 20.0  # make one word win everywhere, so only blocking stops its repetition
    best, scores, _ = beam_search(model, f, beam_size=3, max_len=8, n_best=3, no_repeat_ngram_size=2)
    assert best.shape[:2] == (3, 3) and torch.isfinite(scores).all()
    for caption in best.flatten(0, 1).tolist():
        bigrams = [tuple(caption[i:i + 2]) for i in range(len(caption) - 1) if PAD not in caption[i:i + 2]]
        assert len(bigrams) == len(set(bigrams)), caption
    drawn = sample(model.train(), f, max_len=6, generator=torch.Generator().manual_seed(0))
    assert drawn.shape[0] == 3 and ((drawn >= 0) & (drawn < V)).all()


def test_attention_maps_are_the_last_layers_head_averaged_weights_summing_to_one():
    model, f = make(), torch.randn(2, N, D)
    words = torch.tensor([[START, 4, 5, 6], [START, 7, 8, 9]])
    maps = model.attention_maps(f, words)
    assert maps.shape == (2, 4, N) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4))
    f2 = f.clone()
    f2[:, 0] *= 5  # a different first grid vector moves where the words look
    assert not torch.allclose(model.attention_maps(f2, words)[:, :, 0], maps[:, :, 0])
    pooled = ShowAndTell(D, V, WordEmbedding(V, 8))
    assert pooled.feature_kind == "pooled" and pooled.attention_maps(f[:, 0], words) is None
    assert model.feature_kind == "grid" and model.state_batch_dim == 0


def test_a_checkpoint_rebuilds_the_same_model_with_the_same_outputs(cfg_factory, tmp_path):
    cfg = cfg_factory("model=transformer", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
                      "model.ff_dim=64", "model.positions=learned", "dropout=0.1")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    check_model(model_cfg)  # on the meta device
    itos = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)]
    torch.manual_seed(0)
    module = CaptionModule(itos, D, {"encoder": "none"}, {"dim": 8}, model=model_cfg)
    assert module.hparams["model"]["name"] == "transformer" and module.hparams["model"]["dropout"] == 0.1
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "t.ckpt")

    model = load_model(load_checkpoint(tmp_path / "t.ckpt"), tmp_path / "t.ckpt")
    assert type(model) is type(module.model) and model.entry == module.model.entry
    f, words = torch.randn(2, N, D), torch.randint(1, V, (2, 6))
    torch.testing.assert_close(model(f, words)[0], module.model.eval()(f, words)[0], atol=0, rtol=0)


def test_wrong_settings_and_inputs_are_one_sentence():
    with pytest.raises(CaptionerError, match=re.escape("model.positions=rotary is not one of sinusoidal, learned.")):
        check_model({"name": "transformer", "positions": "rotary"})
    with pytest.raises(CaptionerError, match=re.escape("model.d_model=30 is not a multiple of model.num_heads=8.")):
        check_model({"name": "transformer", "d_model": 30})
    model = make(positions="learned", max_positions=4)
    with pytest.raises(CaptionerError, match=re.escape("takes grid features [batch, grid vectors, dim]; it was given "
                                                       "a tensor of shape [2, 12].")):
        model(torch.randn(2, D), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(CaptionerError, match=re.escape("at most model.max_positions=4 words; it was given 5.")):
        model(torch.randn(2, N, D), torch.ones(2, 5, dtype=torch.long))


def test_it_learns_one_batch_with_dropout():
    model, f = make(dropout=0.1).train(), torch.randn(4, N, D)
    words = torch.randint(3, V, (4, 6))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(30):
        hidden, _ = model(f, words[:, :-1])
        loss = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), words[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
