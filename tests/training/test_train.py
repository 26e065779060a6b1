import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captioner.serving.inference import Captioner
from captioner.run import train
from captioner.utils import CaptionerError
from conftest import run_module


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_training_lowers_the_loss_and_writes_val_ppl_and_checkpoints(trained):
    run_dir = trained["run_dir"]
    val_ppl = scalars(run_dir, "val/ppl")
    val_loss = scalars(run_dir, "val/loss")
    assert len(val_ppl) >= 6 and val_ppl[-1] < val_ppl[0]
    assert val_loss[-1] < val_loss[0]
    assert abs(val_ppl[-1] - torch.tensor(val_loss[-1]).exp().item()) < 1e-3 * val_ppl[-1]
    assert scalars(run_dir, "train/loss") and scalars(run_dir, "train/ppl")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "vocab.txt").read_text().splitlines()[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (run_dir / "history.json").is_file() and (run_dir / "loss.png").is_file()
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["preprocess"]["encoder"] == "efficientnet_lite0" and hp["itos"][4:] and hp["model"]["rnn_type"] == "lstm"
    assert "optimizer_states" in ckpt and ckpt["global_step"] > 0


def best_state(ckpt) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and v.get("monitor"))


def test_a_resumed_run_copies_the_best_checkpoint_and_its_score_into_its_own_folder(tmp_path):
    """Lightning keeps a ModelCheckpoint's best score only when resumed in the same folder; every captioner run
    has its own, so the state is carried over: the previous best file copied in, nothing in the old folder kept."""
    from captioner.training.monitor import BestCheckpoint, RunCheckpoint

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "best.ckpt").write_bytes(b"the best weights")
    saved = {"monitor": "val/loss", "best_model_score": torch.tensor(1.25), "best_model_path": str(old / "best.ckpt"),
             "dirpath": str(old), "best_k_models": {str(old / "best.ckpt"): torch.tensor(1.25)},
             "kth_best_model_path": str(old / "best.ckpt"), "kth_value": torch.tensor(1.25),
             "last_model_path": str(old / "last.ckpt"), "current_score": torch.tensor(1.3)}
    best = BestCheckpoint(dirpath=new, filename="best", monitor="val/loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dirpath has changed"
        best.load_state_dict(saved)
    assert (new / "best.ckpt").read_bytes() == b"the best weights"
    assert best.best_model_path == best.kth_best_model_path == str(new / "best.ckpt")
    assert float(best.best_model_score) == float(best.kth_value) == 1.25 and best.last_model_path == ""
    periodic = RunCheckpoint(dirpath=new, filename="periodic-{step}")  # no monitor: nothing to carry
    periodic.load_state_dict({**saved, "monitor": None, "best_model_path": str(old / "periodic-step=3.ckpt")})
    assert periodic.best_model_path == "" and periodic.best_k_models == {}
    same = BestCheckpoint(dirpath=old, filename="best", monitor="val/loss")  # resumed in place: Lightning's own way
    same.load_state_dict(saved)
    assert same.best_model_path == str(old / "best.ckpt") and same.last_model_path == str(old / "last.ckpt")


def test_resume_continues_the_step_count(cfg_factory):
    first = cfg_factory("iterations=4", "trainer.val_check_interval=2", run="first")
    train(first)
    last = Path(first.paths.run_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    second = cfg_factory("iterations=7", f"ckpt_path={last}", run="second")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(second)
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]  # the state came along
    resumed = torch.load(Path(second.paths.run_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)
    assert resumed["global_step"] == 7
    # best.ckpt is the best of the whole training, in the new run dir: compared with the first part's best
    before = best_state(torch.load(last, map_location="cpu", weights_only=False))
    after = best_state(resumed)
    assert after["best_model_path"] == str(Path(second.paths.run_dir) / "checkpoints" / "best.ckpt")
    assert after["best_model_score"] <= before["best_model_score"] and Path(after["best_model_path"]).is_file()
    # the optimizer state came along: Adam's step counter continues too
    state = resumed["optimizer_states"][0]["state"]
    assert int(next(iter(state.values()))["step"]) == 7


@pytest.mark.parametrize("rnn_type", ["GRU", "rnn"])
def test_other_rnn_types_train_with_two_layers(cfg_factory, rnn_type):
    cfg = cfg_factory(f"rnn_type={rnn_type}", "num_layers=2", "iterations=3", "embeddings=learned")
    assert math.isfinite(train(cfg))
    model = Captioner(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt", "cpu").model
    assert type(model.rnn) is {"gru": torch.nn.GRU, "rnn": torch.nn.RNN}[rnn_type.lower()]
    assert model.rnn.num_layers == 2 and model.init_hidden.out_features == 2 * model.hidden_size


@pytest.mark.parametrize("length, validated_at", [
    ("iterations=2", [2]), ("iterations=5", [3, 5]),
    ("iterations=5 trainer.check_val_every_n_epoch=3", [5]), ("epochs=3 trainer.check_val_every_n_epoch=2", [6, 9])])
def test_a_run_validates_at_its_last_step(cfg_factory, length, validated_at):
    """The smoke set has 3 steps per epoch: iterations=2 stops inside the first epoch, iterations=5 inside the
    second. Either way the last step is validated (with captions: val/CIDEr), reported and compared for
    best.ckpt; before, the run reported the last epoch end's model, or nothing. So is the last epoch when
    check_val_every_n_epoch skips it (before, a run reported the model of its last validation epoch)."""
    cfg = cfg_factory(*length.split(), "eval_every=100", "eval_max_images=8", run="short")
    assert math.isfinite(train(cfg))
    run_dir = Path(cfg.paths.run_dir)
    assert json.loads((run_dir / "history.json").read_text())["val_iterations"] == validated_at
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    ppl, cider = acc.Scalars("val/ppl"), acc.Scalars("val/CIDEr")
    assert len(ppl) == len(validated_at) and [e.step for e in cider] == [ppl[-1].step]  # the last one evaluates
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    best_loss = min(e.value for e in acc.Scalars("val/loss"))  # checkpoint_monitor
    score = best["callbacks"][next(k for k in best["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    assert abs(float(score) - best_loss) < 1e-6 and best["global_step"] in validated_at


@pytest.mark.parametrize("override, message", [
    ("rnn_type=transformer", "rnn_type=transformer is not one of lstm, gru, rnn"),
    ("optimizer=lion", "optimizer=lion is not one of"),
    ("hidden_size=0", "hidden_size=0 must be a positive integer"),
    ("ckpt_path=/nonexistent.ckpt", "ckpt_path=/nonexistent.ckpt does not exist"),
    ("init_from=/nonexistent.ckpt", "init_from=/nonexistent.ckpt does not exist"),
    ("data.image_size=abc", "data.image_size=abc must be an integer >= 32 or null"),
    ("data.num_workers=-3", "data.num_workers=-3 must be an integer >= 0"),
    ("encoder.batch_size=abc", "encoder.batch_size=abc must be a positive integer"),
    ("data.generate.train2017=-5", "data.generate.train2017=-5 must be a positive integer"),
    ("data.resident=maybe", "data.resident=maybe is not one of auto, true, false"),
    pytest.param("trainer=gpu", "trainer.accelerator=gpu: this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"))])
def test_bad_values_are_named(cfg_factory, override, message):
    with pytest.raises(CaptionerError, match=message):
        train(cfg_factory(override))


def run_cli(*args, cwd):
    return run_module("captioner.run", *args, cwd=cwd)


@pytest.mark.slow
def test_cli_reports_a_bad_value_in_one_line(tmp_path, data_dir):
    r = run_cli("rnn_type=foo", f"paths.data_dir={data_dir}", "experiment=smoke", cwd=tmp_path)
    assert r.returncode != 0
    assert "error: rnn_type=foo is not one of lstm, gru, rnn." in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("rnn_type=foo") == 1, r.stderr
    assert "rnn_type=foo is not one of" in next((tmp_path / "outputs" / "runs").glob("*/run.log")).read_text()
    r = run_cli("no_such_key=1", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: Could not override 'no_such_key': there is no such key; check its spelling."
    # a setting a class rejects when it is built (here the Trainer's): one line naming the group
    r = run_cli("trainer.devices=abc", f"paths.data_dir={data_dir}", "experiment=smoke", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: trainer: `devices`")


@pytest.mark.parametrize("args, message", [
    (["rnn_typ=gru"], "error: Could not override 'rnn_typ': there is no such key; check its spelling."),
    (["trainer.max_epochs=3"], "error: Could not override 'trainer.max_epochs': it is set by the top-level key "
                               "epochs; use epochs=<n>."),
    (["trainer.limit_train_batches=2"], "error: Could not override 'trainer.limit_train_batches': there is no such "
                                        "key; check its spelling, or add another argument of Lightning's Trainer "
                                        "with +trainer.limit_train_batches=<value>."),
    (["scheduler=cosne"], "error: In 'config': Could not find 'scheduler/cosne'; expected one of: cosine, none, "
                          "plateau, step."),
    (["rnn_type=gru,lstm"], "error: rnn_type=gru,lstm gives several values: add -m (--multirun) for one run per "
                            "value, or quote the value."),
    (["rnn_type=[a"], "error: cannot read the argument rnn_type=[a"),
    (["hydra.run.dir=/proc/no/such"], "error: hydra.run.dir=/proc/no/such cannot be written"),
    (["-m", "rnn_typ=gru,lstm"], None),  # a sweep's values are checked by each job
    (["-m", "rnn_type=gru,lstm", "hidden_siz=8"], "error: Could not override 'hidden_siz'")])
def test_overrides_are_checked_before_hydra_starts(args, message):
    """Hydra's own reports of these are several lines (or a traceback, for a run folder it cannot create)."""
    from captioner.run import check_overrides

    if message is None:
        check_overrides(args)
        return
    with pytest.raises(SystemExit) as exit:
        check_overrides(args)
    assert str(exit.value).startswith(message)


@pytest.mark.slow
def test_multirun_makes_one_run_dir_per_job(tmp_path, data_dir):
    r = run_cli("-m", "experiment=smoke", "rnn_type=lstm,gru", "epochs=1", f"paths.data_dir={data_dir}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / ".hydra" / "overrides.yaml").is_file()
        assert scalars(job, "val/ppl")


def test_best_checkpoint_compares_the_last_epochs_extra_evaluation(tmp_path):
    """An evaluation metric (val/CIDEr) is logged every eval_every epochs and on the last epoch; best.ckpt must
    compare that last one too (ModelCheckpoint's own every_n_epochs schedule skips it)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from test_fast_paths import dataset, module

    from captioner.data.datamodule import CaptionDataModule
    from captioner.training.monitor import BestCheckpoint, evaluation_due

    class RisingMetric(Callback):  # as CaptionMonitor logs val/CIDEr, a value that improves at each evaluation
        def on_validation_epoch_end(self, trainer, pl_module):
            if evaluation_due(trainer, 2):
                pl_module.log("val/CIDEr", float(trainer.current_epoch))

    for epochs, best_epoch in ((3, 2), (4, 3)):  # eval_every=2: evaluations at epochs 2, 3 (last) / 2, 4
        best = BestCheckpoint(dirpath=tmp_path / str(epochs), filename="best", monitor="val/CIDEr", mode="max",
                              every_n_epochs=2, save_last=True)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, callbacks=[RisingMetric(), best])
        trainer.fit(module(), datamodule=CaptionDataModule({"train": dataset(), "val": dataset()}, batch_size=32))
        assert float(best.best_model_score) == best_epoch
        assert torch.load(best.best_model_path, weights_only=True)["epoch"] == best_epoch
        assert (tmp_path / str(epochs) / "last.ckpt").exists()
    # its state keeps ModelCheckpoint's key: checkpoints written before resume with their best score
    old = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint-9a369cd.ckpt", weights_only=False)
    key = BestCheckpoint(monitor="val/loss", mode="min", every_n_epochs=1).state_key
    assert key in old["callbacks"]
