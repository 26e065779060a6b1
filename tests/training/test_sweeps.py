import csv
import json

import hydra
import pytest
from hydra import compose, initialize_config_module
from pytorch_lightning import Trainer

from captioner.run import train
from conftest import run_module


def compose_full(*overrides):
    with initialize_config_module("captioner.conf", version_base="1.3"):
        return compose("config", overrides=["paths.run_dir=/tmp/unused", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "ddp_cpu"])
def test_trainer_group_composes_and_instantiates(trainer):
    cfg = compose_full(f"trainer={trainer}")
    if cfg.trainer.accelerator == "gpu":
        assert cfg.trainer.precision == "bf16-mixed"
        if trainer == "ddp":  # every GPU of each node
            assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
        else:
            assert cfg.trainer.devices == 1
        cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision = "cpu", 1, "32-true"  # no GPU here
    t = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(t, Trainer)
    if trainer == "ddp_cpu":
        assert t.num_devices == 2
    assert (type(t.strategy).__name__ == "DDPStrategy") == trainer.startswith("ddp")


@pytest.mark.parametrize("logger, cls", [("tensorboard", "TensorBoardLogger"), ("csv", "CSVLogger"), ("none", None)])
def test_logger_group(logger, cls, tmp_path):
    cfg = compose_full(f"logger={logger}", f"paths.run_dir={tmp_path}")
    if cls is None:
        assert cfg.logger._target_ is None
    else:
        assert type(hydra.utils.instantiate(cfg.logger)).__name__ == cls


def test_experiment_debug_search_and_launcher_groups_compose():
    assert compose_full("experiment=show_and_tell").encoder.name == "resnet152"
    assert compose_full("experiment=smoke").hidden_size == 64
    assert compose_full("debug=fdr").trainer.fast_dev_run is True
    assert compose_full("debug=overfit").trainer.overfit_batches == 4
    assert compose_full("debug=limit").trainer.limit_train_batches == 5
    optuna = compose_full("hparams_search=optuna")
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.optimized_metric == "val/ppl"
    assert set(optuna.hydra.sweeper.params) == {"learning_rate", "hidden_size", "rnn_type", "num_layers"}
    slurm = compose_full("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                         "hydra.launcher.gpus_per_node=4")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.gpus_per_node == 4
    assert compose_full("hydra/launcher=submitit_local").hydra.launcher._target_.endswith("LocalLauncher")


@pytest.mark.slow  # three trainings: ~4 s
def test_same_seed_same_val_loss(cfg_factory):
    a = train(cfg_factory("iterations=4", "seed=3", run="a"))
    b = train(cfg_factory("iterations=4", "seed=3", run="b"))
    assert a == b
    assert train(cfg_factory("iterations=4", "seed=4", run="c")) != a  # and the seed is the one that counts


def read_table(sweep):
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_multirun_table_shows_a_crashed_job_as_failed(tmp_path, data_dir):
    r = run_module("captioner.run", "-m", "experiment=smoke", "epochs=1", "rnn_type=lstm,transformer,gru",
                   f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}", "trainer.enable_progress_bar=false",
                   cwd=tmp_path)
    rows = read_table(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"], r.stderr[-2000:]
    assert "rnn_type=transformer is not one of" in rows[1]["error"]
    assert float(rows[0]["val/ppl"]) > 1 and rows[2]["checkpoint"].endswith("last.ckpt")
    assert "| failed |" in (tmp_path / "results.md").read_text()
    assert "rnn_type=transformer is not one of" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_multirun_over_the_models_gives_one_table(tmp_path, data_dir):
    models = ["show_and_tell", "show_attend_tell", "transformer"]
    r = run_module("captioner.run", "-m", "experiment=smoke", "epochs=1", f"model={','.join(models)}",
                   f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}", "trainer.enable_progress_bar=false",
                   cwd=tmp_path)
    rows = read_table(tmp_path)
    assert [r["status"] for r in rows] == ["completed"] * 3, r.stderr[-2000:]
    assert [next(o for o in r["overrides"].split() if o.startswith("model=")) for r in rows] == \
        [f"model={m}" for m in models]
    assert all(float(r["val/ppl"]) > 1 and r["checkpoint"].endswith("last.ckpt") for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert all(f"model={m}" in table for m in models)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["show_and_tell", "show_attend_tell", "transformer"])
def test_ddp_cpu_two_processes_one_run_dir(model, tmp_path, data_dir):
    r = run_module("captioner.run", "trainer=ddp_cpu", "trainer.devices=2", "experiment=smoke", f"model={model}",
                   f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4  # 96 images / batch 32 / 2 processes, 2 epochs: the data was sharded
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (r.stdout + r.stderr).count("Finished:") == 1, "one report per run, not one per process"


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path, data_dir):
    r = run_module("captioner.run", "-m", "hydra/launcher=submitit_local", "experiment=smoke", "epochs=1",
                   "rnn_type=lstm,gru", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["status"] for row in read_table(tmp_path)] == ["completed", "completed"]


@pytest.mark.slow
def test_optuna_search_three_trials(tmp_path, data_dir):
    r = run_module("captioner.run", "-m", "hparams_search=optuna", "experiment=smoke", "epochs=1",
                   "hydra.sweeper.n_trials=3", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_table(tmp_path)
    assert len(rows) == 3 and all(row["status"] == "completed" for row in rows)
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_value" in best
    assert float(best.split("best_value:")[1]) == pytest.approx(min(float(row["val/ppl"]) for row in rows))


def test_results_table_is_rebuilt_from_every_job_file(tmp_path):
    """The multirun table (fast tier; the real multiruns above are slow): one row per job's result.json, in job
    order, evaluation metrics as extra columns, a failed job's error kept, written as CSV and Markdown."""
    from captioner.training.sweep import write_table

    jobs = [{"job": 1, "status": "failed", "overrides": "rnn_type=transformer", "wall_s": 1.0, "run_dir": "r1",
             "error": "rnn_type=transformer is not one of lstm, gru, rnn."},
            {"job": 0, "status": "completed", "overrides": "rnn_type=lstm", "val/loss": 0.5, "val/ppl": 1.6487,
             "val/CIDEr": 0.9, "steps": 4, "wall_s": 2.0, "run_dir": "r0", "checkpoint": "r0/last.ckpt"}]
    for row in jobs:
        (tmp_path / str(row["job"])).mkdir()
        (tmp_path / str(row["job"]) / "result.json").write_text(json.dumps(row))
    rows = read_table_after(write_table, tmp_path)
    assert [r["job"] for r in rows] == ["0", "1"] and [r["status"] for r in rows] == ["completed", "failed"]
    assert rows[0]["val/CIDEr"] == "0.9" and rows[1]["error"].startswith("rnn_type=transformer")
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| job | status | overrides | val/loss | val/ppl | val/CIDEr |") and len(md) == 4


def read_table_after(write, sweep):
    write(sweep)
    return read_table(sweep)


def test_a_failed_jobs_error_is_its_first_line_or_its_type(tmp_path):
    """A bare MemoryError() has no message: its row must still be written (splitlines()[0] raised IndexError,
    and Hydra dropped the row with a warning)."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from captioner.training.sweep import SweepResults

    callback = SweepResults()
    for num, error in enumerate([ValueError("rnn_type=foo is not one of lstm, gru, rnn.\nmore"), MemoryError()]):
        (tmp_path / str(num)).mkdir()
        config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num},
                                             "runtime": {"output_dir": str(tmp_path / str(num))},
                                             "sweep": {"dir": str(tmp_path)}}})
        callback.on_job_start(config)
        callback.on_job_end(config, JobReturn(overrides=[], status=JobStatus.FAILED, _return_value=error))
    rows = read_table(tmp_path)
    assert [(r["status"], r["error"]) for r in rows] == [("failed", "rnn_type=foo is not one of lstm, gru, rnn."),
                                                        ("failed", "MemoryError")]
