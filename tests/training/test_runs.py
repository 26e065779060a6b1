"""What a run keeps: a history with curves that survives resuming, a checkpoint when interrupted, and one shared
dataset when runs start together (issue 14)."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import model_checkpoint

from captioner.checkpoint import load_checkpoint
from captioner.run import train


def history(run_dir):
    return json.loads((Path(run_dir) / "history.json").read_text())


def test_history_has_a_point_every_log_interval_and_validation_and_resume_keeps_them(cfg_factory):
    first = cfg_factory("iterations=6", "trainer.log_every_n_steps=2", "eval_every=0", run="first")
    train(first)  # 3 steps an epoch: validations after steps 3 and 6
    h = history(first.paths.run_dir)
    assert h["iterations"] == [2, 4, 6] and len(h["loss"]) == 3
    assert h["val_iterations"] == [3, 6] and len(h["val_loss"]) == 2
    assert (Path(first.paths.run_dir) / "loss.png").stat().st_size > 10_000  # two curves, not an empty frame
    last = Path(first.paths.run_dir) / "checkpoints" / "last.ckpt"
    second = cfg_factory("iterations=10", "trainer.log_every_n_steps=2", "eval_every=0", f"ckpt_path={last}",
                         run="second")
    model_checkpoint.warning_cache.clear()  # Lightning warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(second)
    # the resumed process first finishes epoch 2 again, before it has validated (BestCheckpoint skips that end)
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    resumed = history(second.paths.run_dir)
    assert resumed["iterations"] == [2, 4, 6, 8, 10] and resumed["loss"][:3] == h["loss"]
    assert resumed["val_iterations"] == [3, 6, 9, 10] and resumed["val_loss"][:2] == h["val_loss"]  # 10: the last step


def start_run(data_dir, run_dir, *overrides):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "captioner.run", "experiment=smoke", f"paths.data_dir={data_dir}",
                             f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", "logger=none",
                             "eval_every=0", *overrides], env=env, cwd=run_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def default_sigint():
    """A child of a process that ignores SIGINT inherits the ignoring (a browser test's launcher leaves it so), and
    Python then installs no KeyboardInterrupt handler: the run must start as from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_saves_the_current_step_and_the_history(data_dir, tmp_path, cfg_factory, signum):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = start_run(data_dir, run_dir, "iterations=100000", "write_every=0.002", "trainer.log_every_n_steps=1")
    deadline = time.monotonic() + 300
    while not (run_dir / "history.json").exists() or len(history(run_dir)["iterations"]) < 4:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == ckpt["global_step"] >= 4 and metrics["interrupted"], (metrics, err[-2000:])
    h = history(run_dir)
    assert h["iterations"][-1] == ckpt["global_step"] and (run_dir / "loss.png").is_file()
    saved = next(state for key, state in ckpt["callbacks"].items() if key.startswith("History"))
    assert saved["history"]["iterations"] == h["iterations"]
    resumed = cfg_factory(f"iterations={ckpt['global_step'] + 2}", "trainer.log_every_n_steps=1", "eval_every=0",
                          f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", run="resumed")
    train(resumed)
    assert history(resumed.paths.run_dir)["iterations"][:len(h["iterations"])] == h["iterations"]
    assert load_checkpoint(Path(resumed.paths.run_dir) / "checkpoints" / "last.ckpt")["global_step"] == \
        ckpt["global_step"] + 2


@pytest.mark.slow
def test_two_runs_started_together_on_a_fresh_data_folder_both_succeed(tmp_path):
    fresh = tmp_path / "data"
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
    processes = [start_run(fresh, run, "iterations=2") for run in runs]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        assert "could not be read" not in err
    root = fresh / "shapes-smoke"
    assert len(list((root / "train2017").glob("*.png"))) == 96 and len(list((root / "val2017").glob("*.png"))) == 32
    assert (root / "annotations" / ".complete.json").is_file()
    for run in runs:
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
