"""The GPU speed paths give the results of the plain ones: batches assembled on the device, the fixed-shape
(ignore-the-pads) loss, logging on intervals, the opt-in compiled step and CUDA-graphed steps. Checked on the CPU,
where the device path runs on CPU tensors and torch.compile uses its CPU backend; the CUDA graphs themselves only
where there is a GPU (benchmarks/gpu_suite.sh runs those tests on the GPU machine)."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from captioner.data.datamodule import CaptionBatches, CaptionDataModule, real_length
from captioner.training.module import CaptionModule
from captioner.data.vocab import END, PAD, SPECIALS, START

V, FEAT = 40, 12


def dataset(n=64, max_words=9, seed=0, caption_idx=-1):
    """n images with 1-3 captions of 2..max_words words each, float16 features, as the token cache has them."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n)
    lengths = rng.integers(2, max_words + 1, counts.sum())
    words = rng.integers(len(SPECIALS), V, lengths.sum())
    cap_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    feats = rng.standard_normal((n, FEAT)).astype(np.float16)
    return CaptionBatches(feats, np.arange(n), words, np.concatenate([[0], np.cumsum(lengths)]), cap_start, counts,
                          caption_idx, seed)


@pytest.mark.parametrize("pad_to", [1, 8])
def test_batches_built_on_the_device_equal_the_host_ones(pad_to):
    host, device = dataset(), dataset()
    device.to_device("cpu")  # the device path, run on CPU tensors
    assert device.device_ids is not None
    for ds in (host, device):
        ds.pad_to = pad_to
        ds.set_epoch(3)
    for rows in ([5, 0, 63, 17], list(range(64)), [9]):
        for a, b in zip(host.__getitems__(rows), device.__getitems__(rows)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        _, inputs, targets, real = host.__getitems__(rows)
        assert torch.equal(real, (targets.flatten() != PAD).nonzero().view(-1)), "real: the non-pad targets"
        assert targets.shape[1] % pad_to == 0 and (targets == END).sum() == len(rows)
        assert (inputs[:, 0] == START).all() and not (inputs == END).any()


def test_a_batch_already_on_the_device_is_passed_through_and_others_are_moved():
    dm = CaptionDataModule(datasets={"train": dataset()}, batch_size=4)
    batch = dataset().__getitems__([0, 1])
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch  # no walk, no copies
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert [t.device.type for t in moved] == ["meta"] * 4 and [t.shape for t in moved] == [t.shape for t in batch]


def module(compile=False, cls=CaptionModule):
    torch.manual_seed(0)
    return cls(SPECIALS + [f"w{i}" for i in range(V - 4)], FEAT, preprocess={},
                         embeddings={"name": "learned", "dim": 16}, hidden_size=32, learning_rate=3e-3,
                         compile=compile)


class PlainLoss(CaptionModule):
    """The loss as it was: boolean indexing of the real tokens, logged every step."""

    def loss(self, batch):
        features, inputs, targets = batch[:3]
        hidden, _ = self.model(features, inputs)
        mask = targets != PAD
        return F.cross_entropy(self.model.out(hidden[mask]).float(), targets[mask]), targets[mask]

    def training_step(self, batch, batch_idx):
        loss, _ = self.loss(batch)
        self.log("train/loss", loss)
        return loss


def fit(m, steps, ds, pad_to=1, on_device=False, pad_real=False, accelerator="cpu", **trainer_args):
    if on_device:
        ds.to_device(accelerator)
    dm = CaptionDataModule(datasets={"train": ds, "val": ds}, batch_size=16,
                           shuffle=True, pad_to=pad_to, pad_real=pad_real)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=3, num_sanity_val_steps=0, val_check_interval=steps,
                         check_val_every_n_epoch=None, **{"deterministic": True, **trainer_args})
    pl.seed_everything(0)
    trainer.fit(m, datamodule=dm)
    return trainer


def test_results_are_those_of_the_plain_loss_and_host_batches():
    plain = fit(module(cls=PlainLoss), 12, dataset())
    fast = fit(module(), 12, dataset(), on_device=True)
    assert abs(float(plain.callback_metrics["val/loss"]) - float(fast.callback_metrics["val/loss"])) < 1e-4
    for a, b in zip(plain.lightning_module.parameters(), fast.lightning_module.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert "train/loss" in fast.callback_metrics  # logged on intervals, still there for callbacks and loggers


def test_no_logged_value_is_read_back_after_each_step(monkeypatch):
    """Lightning turns every progress-bar metric into a number after each batch (a GPU sync per step, even for a
    stale value); the loss is logged without prog_bar and the progress bar reads it only when it refreshes."""
    import pytorch_lightning.trainer.connectors.logger_connector.result as result

    from captioner.training.monitor import LossProgressBar

    read_back = []
    convert = result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda v: read_back.append(1) or convert(v))
    counts = []
    for steps in (12, 24):  # one validation at the end of each: its prog-bar metrics are converted once
        read_back.clear()
        trainer = fit(module(), steps, dataset(), on_device=True)
        counts.append(len(read_back))
    assert trainer.global_step == 24 and counts[0] == counts[1], "conversions must not grow with the steps"
    bar = LossProgressBar()
    assert bar.get_metrics(trainer, trainer.lightning_module)["train/loss"] == \
        f"{float(trainer.callback_metrics['train/loss']):.3f}"


@pytest.mark.slow
def test_compiled_and_eager_steps_agree():
    """torch.compile of the loss (forward, cross-entropy and so their backward) over fixed, padded shapes:
    the same weights after the same steps. All captions fit one length bucket, so it compiles once."""
    eager = fit(module(), 6, dataset(max_words=6), pad_to=8)
    compiled_module = module(compile=True)
    compiled = fit(compiled_module, 6, dataset(max_words=6), pad_to=8)
    assert compiled_module.compiled_loss is not None
    for a, b in zip(eager.lightning_module.parameters(), compiled.lightning_module.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert abs(float(eager.callback_metrics["val/loss"]) - float(compiled.callback_metrics["val/loss"])) < 1e-5


def test_compile_setting_is_checked_and_the_progress_bar_refreshes_less_on_a_gpu(cfg_factory):
    from captioner.run import progress_rate, train
    from captioner.utils import CaptionerError

    with pytest.raises(CaptionerError, match="compile=fast is not one of false, true, graphs, default, reduce-ov"):
        train(cfg_factory("compile=fast"))
    assert progress_rate(cfg_factory("trainer=gpu")) == 50
    assert progress_rate(cfg_factory("trainer=cpu")) == 1
    assert cfg_factory().compile is False and cfg_factory("compile=reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(CaptionerError, match="compile=graphs captures the training step on one device, not 2"):
        train(cfg_factory("compile=graphs", "trainer=ddp_cpu", "trainer.devices=2"))


@pytest.mark.parametrize("pad_to", [1, 8])
def test_padded_real_positions_point_at_a_pad_and_leave_the_loss_as_it_is(pad_to):
    """pad_real (compile=graphs): real positions padded to few counts, the padding pointing at a <pad> target,
    which the loss ignores, also with label smoothing and in scheduled sampling's loss. The batch keeps at least
    one <pad> column for it."""
    plain, padded = dataset(max_words=7), dataset(max_words=7)
    padded.to_device("cpu")
    for ds in (plain, padded):
        ds.pad_to = pad_to
    padded.pad_real = True
    m = module()
    m.hparams.label_smoothing = 0.1
    padded_some = False
    for rows in ([5, 0, 63, 17], list(range(64)), [9], list(range(0, 64, 3))):
        a, b = plain.__getitems__(rows), padded.__getitems__(rows)
        n, t = len(a[3]), b[2].shape[1]
        assert len(b[3]) == real_length(n) and torch.equal(b[3][:n], (b[2].flatten() != PAD).nonzero().view(-1))
        assert (b[2].flatten()[b[3][n:]] == PAD).all() and (b[2][:, -1] == PAD).all() and t % pad_to == 0
        padded_some |= len(b[3]) > n
        for training in (True, False):  # smoothed (training) and plain (validation) cross-entropy
            m.train(training)
            loss_a, targets_a = m.loss(a)
            loss_b, targets_b = m.loss(b)
            assert torch.allclose(loss_a, loss_b, atol=1e-6)
            assert (targets_a != PAD).sum() == (targets_b != PAD).sum() == n  # validation's weight
        m.train()
        assert torch.allclose(m.scheduled_sampling_loss(b, 0.0), m.loss(a)[0], atol=1e-5)  # p=0: teacher forcing
    assert padded_some
    assert [real_length(n) for n in (1, 16, 17, 100, 3200, 3328, 3329)] == [16, 16, 32, 112, 3328, 3328, 3584]


class BatchShapes(pl.Callback):
    """The shapes of every training batch, in order."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(tuple(tuple(t.shape) for t in batch))


def test_graphed_setting_trains_as_the_plain_step_without_a_gpu():
    """compile=graphs off a GPU: the loss runs as it is, on the padded batches, with the plain step's results. The
    training batches stay padded when the same dataset also serves validation (it did not: its val loader, made
    later, turned the padding of real positions off)."""
    plain = fit(module(), 10, dataset(), on_device=True)
    graphed_module, shapes = module(compile="graphs"), BatchShapes()
    graphed = fit(graphed_module, 10, dataset(), pad_to=8, on_device=True, pad_real=True, callbacks=[shapes])
    assert graphed_module.step_graphs is not None and not graphed_module.step_graphs.graphs  # none on a CPU
    assert all(s[1][1] % 8 == 0 and s[3][0] == real_length(s[3][0]) for s in shapes.seen)
    for a, b in zip(plain.lightning_module.parameters(), graphed.lightning_module.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert abs(float(plain.callback_metrics["val/loss"]) - float(graphed.callback_metrics["val/loss"])) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; benchmarks/gpu_suite.sh "
                                                            "runs this on the GPU machine")
@pytest.mark.parametrize("precision, accumulate", [("32-true", 1), ("bf16-mixed", 1), ("32-true", 2)])
def test_graphed_steps_equal_the_plain_ones_on_a_gpu(precision, accumulate):
    """compile=graphs on a GPU: the loss's forward and backward replayed as CUDA graphs, one per batch shape, give
    the plain step's weights and val/loss (also accumulating gradients, which a replay must not overwrite), with
    gradient clipping and label smoothing on; and the logged loss is the step's, not a later replay's. 72 images
    in batches of 16: each epoch's last batch of 8 runs eagerly, between replays."""
    runs, shapes = [], BatchShapes()
    for compile in (False, "graphs"):
        m = module(compile=compile)
        m.hparams.label_smoothing = 0.1
        trainer = fit(m, 24, dataset(72), pad_to=8, on_device=True, pad_real=True, accelerator="cuda",
                      precision=precision, accumulate_grad_batches=accumulate, gradient_clip_val=0.5,
                      deterministic=False, callbacks=[shapes] if compile else [])
        runs.append((m, trainer))
    (plain, plain_trainer), (graphed, graphed_trainer) = runs
    full = [s for s in shapes.seen if s[0][0] == 16]
    assert len(full) < len(shapes.seen), "some batches had 8 rows"
    assert {key[:4] for key in graphed.step_graphs.graphs} == set(full), "a graph per full batch's shapes only"
    assert len(full) > len(set(full)), "later batches replayed a graph"
    atol = 1e-4 if precision == "32-true" else 2e-2
    for a, b in zip(plain.parameters(), graphed.parameters()):
        assert torch.allclose(a, b, atol=atol)
    for key in ("val/loss", "train/loss"):
        assert abs(float(plain_trainer.callback_metrics[key]) - float(graphed_trainer.callback_metrics[key])) < atol


def test_a_resumed_run_draws_the_captions_of_its_epoch_also_with_workers(tmp_path):
    """caption_idx < 0 draws a caption per image per epoch. A resumed run's first DataLoader workers start before
    ResampleCaptions sets the epoch's draw, so the data module sets it when it makes the loader."""
    from captioner.data.datamodule import ResampleCaptions

    class Recording(CaptionModule):
        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch[2])
            return super().training_step(batch, batch_idx)

    def run(epochs, ckpt=None):
        m = module(cls=Recording)
        m.seen = {}
        dm = CaptionDataModule(datasets={"train": dataset(), "val": dataset()}, batch_size=16, shuffle=False,
                               num_workers=1)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[ResampleCaptions()], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(m, datamodule=dm, ckpt_path=ckpt)
        return m.seen, trainer

    full, _ = run(2)
    _, first = run(1)
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed, _ = run(2, tmp_path / "epoch0.ckpt")
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not same(full[0], full[1]), "each epoch draws anew"
    assert list(resumed) == [1] and same(resumed[1], full[1])


@pytest.mark.slow
def test_compiled_scst_sampling_and_reward_equal_the_eager_ones():
    """With `compile`, SCST samples all its words in one graph (the RNN through single-step cells: torch.compile
    cannot trace nn.LSTM) and scores them with a compiled CIDEr-D. With the same random numbers (inductor's
    fallback_random), the captions, rewards, loss and gradients are the eager ones."""
    import torch._inductor.config

    from captioner.models.decoding import sample
    from captioner.training.scst import SCSTModule

    g = torch.Generator().manual_seed(2)
    references = torch.randint(len(SPECIALS), V, (6, 3, 7), generator=g)
    references[:, :, 5:] = PAD
    batch = (torch.randn(4, FEAT, generator=g), None, None, None, torch.tensor([0, 5, 2, 2]))
    grads = []
    torch._dynamo.utils.counters.clear()
    for compile in (False, True):
        torch.manual_seed(0)
        scst = SCSTModule(SPECIALS + [f"w{i}" for i in range(V - 4)], FEAT, preprocess={},
                          embeddings={"name": "learned", "dim": 16}, hidden_size=32, num_layers=2, compile=compile,
                          config={"scst": {"samples": 3, "max_len": 8}})
        scst.prepare(references)
        scst.log = lambda *a, **k: None  # no Trainer here
        assert (scst.sampler is sample) != compile and (scst.reward is scst.cider) != compile
        with torch._inductor.config.patch(fallback_random=True):
            torch.manual_seed(1)
            tokens = scst.sampler(scst.model, batch[0].repeat_interleave(3, 0), 8)
            rewards = scst.rewards(tokens, batch[-1], 3)
            scst.hparams.config["scst"]["baseline"] = "greedy"  # its captions stop early: padded to max_len
            torch.manual_seed(1)
            greedy_loss = scst.training_step(batch, 0).detach()
            scst.hparams.config["scst"]["baseline"] = "mean"
            torch.manual_seed(1)
            loss = scst.training_step(batch, 0)
        loss.backward()
        grads.append([p.grad for p in scst.parameters() if p.grad is not None])
        if not compile:
            eager = tokens, rewards, loss, greedy_loss
    assert not torch._dynamo.utils.counters["graph_break"], "each compiled function must be one whole graph"
    torch.manual_seed(1)
    assert torch.equal(eager[0], sample(scst.model, batch[0].repeat_interleave(3, 0), 8, check_every=0))
    assert torch.equal(tokens, eager[0]) and (tokens == END).any()
    torch.testing.assert_close(rewards, eager[1], rtol=1e-12, atol=1e-12)
    assert rewards.max() > 0, "some n-grams of the samples are in the references"
    torch.testing.assert_close(loss, eager[2])
    torch.testing.assert_close(greedy_loss, eager[3])
    assert abs(greedy_loss.item() - loss.item()) > 1e-6, "the greedy baseline is another baseline"
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
