import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO_MINI = Path(os.environ.get("CAPTIONER_COCO_MINI", SHARED / "datasets" / "coco-mini"))


def make_cfg(data_dir, run_dir, *overrides, name="config"):
    """The real composed training config, pointed at test folders."""
    with initialize_config_module("captioner.conf", version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.data_dir={data_dir}", f"paths.run_dir={run_dir}",
                                                     *overrides])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data folder per test session: generated datasets and caches are built once and shared."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def cfg_factory(data_dir, tmp_path):
    def factory(*overrides, run="run"):
        return make_cfg(data_dir, tmp_path / run, "experiment=smoke", "trainer.enable_progress_bar=false",
                        "trainer.enable_model_summary=false", *overrides)
    return factory


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A checkpoint from a short real training on the smoke shapes set (shared by decoding/CLI tests)."""
    from captioner.run import train

    run_dir = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(data_dir, run_dir, "experiment=smoke", "epochs=6", "trainer.enable_progress_bar=false",
                   "trainer.enable_model_summary=false")
    ppl = train(cfg)
    return {"cfg": cfg, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", "ppl": ppl}


def require_coco_mini():
    if not (COCO_MINI / "annotations" / "captions_val2017.json").exists():
        pytest.skip(f"coco-mini is not present at {COCO_MINI} (set CAPTIONER_COCO_MINI to its folder)")
    return COCO_MINI


def run_module(module, *args, cwd, timeout=600):
    """Run `python -m <module> args...` as a user would, in `cwd`."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
