"""Training recipes: each option is checked by what it must change (and what it must leave alone)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.models.decoding import sample
from captioner.training.module import CaptionModule
from captioner.run import train
from captioner.training.scst import baseline_of, caption_nll, policy_loss
from captioner.utils import CaptionerError
from captioner.data.vocab import END, PAD, START, UNK
from test_train import scalars

ITOS = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(16)]


def make_module(**kw):
    torch.manual_seed(0)
    return CaptionModule(itos=ITOS, feature_dim=10, preprocess={}, embeddings={"dim": 8}, hidden_size=16, **kw)


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, 10, generator=g)
    targets = torch.randint(4, len(ITOS), (4, 6), generator=g)
    targets[:, 5] = END
    targets[0, 3:] = torch.tensor([END, PAD, PAD])  # a shorter caption: padding must not count
    inputs = torch.cat([torch.full((4, 1), START), targets[:, :-1]], 1)
    inputs[inputs == END] = PAD
    return features, inputs, targets, (targets.flatten() != PAD).nonzero().view(-1)  # as CaptionBatches gives


def test_dropout_changes_training_outputs_but_not_evaluation_outputs():
    plain, dropped = make_module(), make_module(dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    features, inputs = fixed_batch()[:2]
    for m in (plain, dropped):
        m.eval()
    assert torch.equal(plain.model(features, inputs)[0], dropped.model(features, inputs)[0])
    assert torch.equal(plain.model.step(inputs[:, 0], plain.model.initial_state(features))[0],
                       dropped.model.step(inputs[:, 0], dropped.model.initial_state(features))[0])
    dropped.train()
    torch.manual_seed(0)
    out = dropped.model(features, inputs)[0]
    assert not torch.equal(out, plain.model(features, inputs)[0])
    assert (out == 0).float().mean() > 0.3  # the RNN output itself is dropped before the vocabulary layer


def test_label_smoothing_changes_the_training_loss_by_the_expected_amount():
    eps = 0.1
    smooth, plain = make_module(label_smoothing=eps), make_module()
    batch = fixed_batch()
    features, inputs, targets = batch[:3]
    hidden, _ = plain.model(features, inputs)
    mask = targets != PAD
    logp = F.log_softmax(plain.model.out(hidden[mask]), -1)
    nll = -logp.gather(1, targets[mask][:, None]).mean()
    uniform = -logp.mean()  # cross-entropy against the uniform distribution over the vocabulary
    smooth.train(), plain.train()
    assert torch.allclose(plain.loss(batch)[0], nll, atol=1e-6)
    assert torch.allclose(smooth.loss(batch)[0], (1 - eps) * nll + eps * uniform, atol=1e-6)
    assert (smooth.loss(batch)[0] - plain.loss(batch)[0]).item() == pytest.approx(eps * (uniform - nll).item(), abs=1e-5)
    smooth.eval()  # val/loss stays the plain cross-entropy (perplexity keeps its meaning)
    assert torch.allclose(smooth.loss(batch)[0], nll, atol=1e-6)


def test_scheduled_sampling_probability_ramps_and_feeds_the_model_its_own_words():
    m = make_module(scheduled_sampling={"start": 1, "increase_every": 2, "increase_prob": 0.2, "max_prob": 0.5})
    probs = [m.sampling_probability(epoch) for epoch in range(8)]
    assert probs == pytest.approx([0, 0, 0, 0.2, 0.2, 0.4, 0.4, 0.5])
    batch = fixed_batch()
    m.train()
    # p = 0 through the step-by-step path is exactly teacher forcing
    assert torch.allclose(m.scheduled_sampling_loss(batch, 0.0), m.loss(batch)[0], atol=1e-5)
    torch.manual_seed(0)
    own = m.scheduled_sampling_loss(batch, 1.0)
    assert not torch.allclose(own, m.loss(batch)[0], atol=1e-5, rtol=0)
    # with p = 1 every input after <start> is the model's sample: a model that always says w5 then sees only w5
    with torch.no_grad():
        m.model.out.weight.zero_()
        m.model.out.bias.fill_(-30.0)
        m.model.out.bias[ITOS.index("w5")] = 30.0
    seen = []
    step = m.model.step
    m.model.step = lambda words, state: (seen.append(words.clone()), step(words, state))[1]
    m.scheduled_sampling_loss(batch, 1.0)
    m.model.step = step
    inputs = batch[1]
    for t in range(1, inputs.shape[1]):
        real = inputs[:, t] != PAD
        assert (seen[t][real] == ITOS.index("w5")).all() and (seen[t][~real] == PAD).all()


def test_scst_gradient_has_the_sign_of_reward_minus_baseline():
    tokens = torch.tensor([[5, 6, END], [5, END, PAD], [7, 7, END], [8, END, PAD]])
    logps = torch.full(tokens.shape, -1.0, requires_grad=True)
    rewards = torch.tensor([2.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    advantage = rewards - baseline_of(rewards, 2, "mean")  # two images, two samples each
    assert advantage.tolist() == [1.0, -1.0, 0.0, 0.0]
    policy_loss(logps, tokens, advantage).backward()
    real = tokens != PAD
    # gradient descent raises log p where the sample beat its baseline and lowers it where it did not
    assert (logps.grad[0][real[0]] < 0).all() and (logps.grad[1][real[1]] > 0).all()
    assert (logps.grad[2:] == 0).all() and (logps.grad[~real] == 0).all()
    assert torch.allclose(logps.grad[0][real[0]], torch.tensor(-1.0 / real.sum().item()))
    greedy = baseline_of(rewards, 2, "greedy", torch.tensor([1.5, 0.0], dtype=torch.float64))
    assert greedy.tolist() == [1.5, 1.5, 0.0, 0.0]


def test_scst_dataset_pickles_for_dataloader_workers():
    """Workers started by spawn or forkserver get the dataset pickled; ImageRows must survive that."""
    import pickle

    from test_fast_paths import dataset

    from captioner.training.scst import ImageRows

    rows = ImageRows(dataset())
    copy = pickle.loads(pickle.dumps(rows))
    for a, b in zip(rows.__getitems__([3, 1, 7]), copy.__getitems__([3, 1, 7])):
        assert torch.equal(a, b)
    assert copy.__getitems__([3, 1, 7])[-1].tolist() == [3, 1, 7]


def test_scst_samples_follow_the_model_distribution():
    m = make_module().model
    features = torch.randn(1, 10).repeat(8000, 1)
    torch.manual_seed(0)
    tokens = sample(m, features, max_len=1)
    assert not tokens.requires_grad
    logits, _ = m.step(torch.full((1,), START), m.initial_state(features[:1]))
    logits[:, [PAD, START, UNK]] = float("-inf")
    expected = logits.softmax(-1)[0]
    observed = torch.bincount(tokens[:, 0], minlength=len(ITOS)).float() / len(tokens)
    assert (observed - expected).abs().max() < 0.02
    assert observed[PAD] == 0 and observed[START] == 0 and observed[UNK] == 0
    # the teacher-forced re-scoring gives the log-probabilities of the distribution the words were drawn from
    assert torch.allclose(-caption_nll(m, features, tokens)[:, 0], torch.log(expected)[tokens[:, 0]].detach(),
                          atol=1e-5)


def test_scst_rescoring_equals_the_word_by_word_log_probabilities():
    """caption_nll's one pass over whole captions = the log-probabilities of each word, step by step, as the
    sampler saw them; 0 after the end; and its gradient reaches every parameter."""
    m = make_module().model
    torch.manual_seed(1)
    features = torch.randn(3, 10).repeat_interleave(4, 0)  # 4 captions per image
    tokens = sample(m, features, max_len=6)
    tokens[0] = torch.tensor([5, 6, END, PAD, PAD, PAD])  # one caption that ends early
    nll = caption_nll(m, features, tokens)
    state = m.initial_state(features)
    words, expected = torch.full((12,), START), []
    for t in range(tokens.shape[1]):
        logits, state = m.step(words, state)
        logits[:, [PAD, START, UNK]] = float("-inf")
        expected.append(-logits.log_softmax(-1).gather(1, tokens[:, t:t + 1]).squeeze(1))
        words = tokens[:, t]
    expected = torch.stack(expected, 1).masked_fill(tokens == PAD, 0.0)
    assert torch.allclose(nll, expected, atol=1e-5) and (nll[0, 3:] == 0).all() and (nll[0, :3] > 0).all()
    # the GPU's fixed-shape form (every position scored, pads ignored) gives the same numbers
    assert torch.allclose(caption_nll(m, features, tokens, real_only=False), nll, atol=1e-6)
    nll.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def run_cfg(cfg_factory, *overrides, run):
    return cfg_factory("eval_every=0", "trainer.log_every_n_steps=1", *overrides, run=run)


@pytest.mark.parametrize("scheduler, check", [
    ("none", lambda lr: len(set(lr)) == 1 and lr[0] == pytest.approx(3e-3)),
    ("step", lambda lr: lr[0] == pytest.approx(3e-3) and lr[-1] == pytest.approx(3e-3 * 0.5 ** 2)),
    ("cosine", lambda lr: lr[0] < lr[2] and lr[-1] < 0.3 * max(lr)),
    # a rate too small to move val/loss (by ReduceLROnPlateau's 1e-4 threshold) but above its eps (1e-8): it
    # stalls, and with patience 0 the rate halves after the second epoch
    ("plateau", lambda lr: lr[:6] == pytest.approx([1e-7] * 6, abs=1e-12) and
     lr[6:] == pytest.approx([5e-8] * 3, abs=1e-12))])
def test_scheduler_changes_train_lr(cfg_factory, scheduler, check):
    extra = {"step": ["scheduler.step_size=1", "scheduler.gamma=0.5"], "cosine": ["scheduler.warmup_steps=3"],
             "plateau": ["learning_rate=1e-7", "scheduler.patience=0", "scheduler.factor=0.5"]}
    cfg = run_cfg(cfg_factory, f"scheduler={scheduler}", "epochs=3", *extra.get(scheduler, []), run=scheduler)
    train(cfg)
    lr = scalars(Path(cfg.paths.run_dir), "train/lr")
    assert len(lr) == 9 and check(lr), lr


def test_regularisers_reach_the_model_and_optimizer(cfg_factory):
    cfg = run_cfg(cfg_factory, "dropout=0.3", "label_smoothing=0.1", "weight_decay=0.05", "optimizer=adamw",
                  "scheduled_sampling.max_prob=0.25", "scheduled_sampling.increase_every=1",
                  "scheduled_sampling.increase_prob=0.25", "epochs=2", run="reg")
    calls = []  # which loss each training step used: scheduled sampling's from the epoch where p > 0
    original = CaptionModule.scheduled_sampling_loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CaptionModule, "scheduled_sampling_loss",
                   lambda self, batch, p: calls.append((self.current_epoch, p)) or original(self, batch, p))
        train(cfg)
    assert calls == [(1, 0.25)] * 3  # epoch 0: p = 0, the plain loss; epoch 1: p = 0.25 for its 3 steps
    ckpt = torch.load(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["dropout"] == 0.3 and hp["label_smoothing"] == 0.1
    assert CaptionModule(**hp).model.drop.p == 0.3  # the checkpoint's model has its dropout
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.05
    assert scalars(Path(cfg.paths.run_dir), "train/ss_prob") == pytest.approx([0.0, 0.25])


@pytest.mark.slow
def test_scst_starts_from_a_cross_entropy_checkpoint_and_resumes_from_its_own(trained, cfg_factory):
    first = cfg_factory("objective=scst", f"init_from={trained['ckpt']}", "epochs=2", "eval_every=1",
                        "trainer.log_every_n_steps=1", "eval_max_images=16", run="scst1")
    train(first)
    run_dir = Path(first.paths.run_dir)
    assert len(scalars(run_dir, "train/reward")) == 6 and scalars(run_dir, "train/reward_baseline")
    assert len(scalars(run_dir, "val/CIDEr")) == 2
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    from PIL import Image  # loss.png: the policy loss in a third panel, not as a cross-entropy and its exp

    assert Image.open(run_dir / "loss.png").size[0] == 3 * Image.open(trained["run_dir"] / "loss.png").size[0] // 2
    start = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    own = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert own["global_step"] == 6  # a new stage: its own step count and optimizer, not the XE run's
    best = own["callbacks"]
    assert any("val/CIDEr" in str(k) for k in best), "val/CIDEr must pick the SCST checkpoints"
    assert own["hyper_parameters"]["itos"] == start["hyper_parameters"]["itos"]
    assert not torch.equal(own["state_dict"]["model.out.weight"], start["state_dict"]["model.out.weight"])
    # it really started from the XE weights: the first SCST validation loss is close to the XE one, not untrained
    untrained = cfg_factory("objective=scst", "epochs=1", "eval_every=1", "eval_max_images=16", run="scratch")
    train(untrained)
    assert scalars(run_dir, "val/loss")[0] < scalars(Path(untrained.paths.run_dir), "val/loss")[0]
    second = cfg_factory("objective=scst", f"init_from={trained['ckpt']}", "epochs=3", "eval_every=1",
                         f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "eval_max_images=16", run="scst2")
    train(second)
    resumed = torch.load(Path(second.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)
    assert resumed["global_step"] == 9
    assert int(next(iter(resumed["optimizer_states"][0]["state"].values()))["step"]) == 9


@pytest.mark.parametrize("override, message", [
    ("objective=rl", "objective=rl is not one of xe, scst"),
    ("scst.baseline=max", "scst.baseline=max is not one of mean, greedy"),
    ("scst.samples=1", "scst.samples=1 must be an integer >= 2"),
    ("dropout=1.5", "dropout=1.5 must be a number in"),
    ("init_from=/nonexistent.ckpt", "init_from=/nonexistent.ckpt does not exist"),
    ("scheduler.name=linear", "scheduler=linear is not one of none, step, cosine, plateau")])
def test_bad_recipe_values_are_named(cfg_factory, override, message):
    with pytest.raises(CaptionerError, match=message):
        train(cfg_factory(override, "iterations=1"))


def test_init_from_another_vocabulary_is_named(trained, cfg_factory):
    with pytest.raises(CaptionerError, match="was trained with another vocabulary or encoder"):
        train(cfg_factory(f"init_from={trained['ckpt']}", "vocab_size=5", "iterations=1"))
