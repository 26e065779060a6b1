"""Show, Attend and Tell: step-by-step decoding is the teacher-forced pass, attention weights are distributions,
the doubly stochastic regulariser has its documented value and reaches the training loss."""
import json
from pathlib import Path

import pytest
import torch

from captioner.data.vocab import END, PAD, START
from captioner.models import MODELS, build_model
from captioner.models.decoding import beam_search
from captioner.models.layers import WordEmbedding
from captioner.models.show_attend_tell import attention_penalty


def make(**kw):
    torch.manual_seed(0)
    return build_model("show_attend_tell", 10, 12, WordEmbedding(12, 8), hidden_size=16, attention_dim=8, **kw)


def test_it_is_registered_as_a_grid_model():
    assert MODELS["show_attend_tell"].feature_kind == "grid" and MODELS["show_and_tell"].feature_kind == "pooled"


def test_decoding_word_by_word_gives_the_teacher_forced_logits():
    model = make(dropout=0.5).eval()
    grid, words = torch.randn(3, 6, 10), torch.randint(2, 12, (3, 5))
    words[:, 0] = START
    forced = model.logits(model(grid, words)[0])
    state, stepped = model.initial_state(grid), []
    for t in range(words.shape[1]):
        logits, state = model.step(words[:, t], state)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), forced)
    # beam search moves every state tensor along dimension 0, grid and its projection included
    tokens, _, _ = beam_search(model, grid, beam_size=3, max_len=6)
    assert tokens.shape[:2] == (3, 1)


def test_attention_rows_are_distributions_over_the_grid_and_follow_the_image():
    model = make().eval()
    grid, words = torch.randn(2, 6, 10), torch.tensor([[START, 4, 5, END], [START, 3, PAD, PAD]])
    alpha = model.attention_maps(grid, words)
    assert alpha.shape == (2, 4, 6) and (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 4))
    grid[0, 2] += 5.0  # one grid vector changes: where the model looks changes
    assert not torch.allclose(model.attention_maps(grid, words)[0], alpha[0])
    assert MODELS["show_and_tell"].attention_maps(None, grid, words) is None  # the interface's default


def test_the_regulariser_is_lambda_times_the_mean_squared_shortfall_over_images_and_grid_vectors():
    alpha = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]],   # two real steps, then a pad step
                          [[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]])  # three real steps
    real = torch.tensor([[True, True, False], [True, True, True]])
    # image 0: totals (1.5, 0.5) -> 0.25 + 0.25; image 1: totals (1.4, 1.6) -> 0.16 + 0.36
    expected = 2.0 * ((0.25 + 0.25) + (0.16 + 0.36)) / 4  # a mean over 2 images x 2 grid vectors
    assert attention_penalty(alpha, real, 2.0).item() == pytest.approx(expected)


def test_the_regulariser_is_the_models_aux_loss_in_training_only():
    model = make(attention_reg=0.5)
    grid, words = torch.randn(2, 6, 10), torch.tensor([[START, 4, 5, 6], [START, 3, PAD, PAD]])
    model.train()(grid, words)
    expected = attention_penalty(model.attention_maps(grid, words), words != PAD, 0.5)
    torch.testing.assert_close(model.aux_loss, expected)
    model.eval()(grid, words)
    assert model.aux_loss is None  # val/loss stays the plain cross-entropy
    assert make(attention_reg=0.0).train()(grid, words) is not None and model.aux_loss is None


def test_the_training_module_adds_the_models_aux_loss_to_its_training_loss_only():
    from captioner.training.module import CaptionModule

    torch.manual_seed(0)
    module = CaptionModule(itos=[f"w{i}" for i in range(12)], feature_dim=10, preprocess={},
                           embeddings={"dim": 8}, model={"name": "show_attend_tell", "hidden_size": 16,
                                                         "attention_dim": 8, "attention_reg": 3.0})
    inputs = torch.tensor([[START, 4, 5, 6], [START, 3, PAD, PAD]])
    targets = torch.tensor([[4, 5, 6, END], [3, END, PAD, PAD]])
    batch = (torch.randn(2, 6, 10), inputs, targets)
    train_loss = module.train().loss(batch)[0]
    aux = module.model.aux_loss
    assert aux is not None and aux > 0
    torch.testing.assert_close(train_loss, module.eval().loss(batch)[0] + aux)


@pytest.mark.slow
def test_a_run_logs_the_cross_entropy_as_train_loss_and_the_regulariser_apart(cfg_factory):
    from captioner.run import train

    cfg = cfg_factory("model=show_attend_tell", "iterations=2", "hidden_size=16", "embeddings=learned",
                      "embeddings.dim=8", "batch_size=8", "eval_every=0", "+trainer.limit_val_batches=1",
                      "trainer.log_every_n_steps=1", "model.attention_reg=100")
    train(cfg)
    history = json.loads((Path(cfg.paths.run_dir) / "history.json").read_text())
    # the vocabulary's cross-entropy is a few nats; the regulariser at lambda=100 is far above it
    assert history["loss"] and all(0 < x < 10 for x in history["loss"])
