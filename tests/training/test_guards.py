"""Diverged training and damaged checkpoints end in one sentence, never in NaN captions (issue 25)."""
from pathlib import Path

import pytest

from captioner.checkpoint import load_checkpoint
from captioner.run import train
from captioner.utils import CaptionerError

DIVERGES = ("learning_rate=1e30", "optimizer=sgd", "eval_every=0")  # NaN weights after a step or two


def test_training_stops_on_the_first_non_finite_loss(cfg_factory):
    cfg = cfg_factory(*DIVERGES, "trainer.log_every_n_steps=1")
    with pytest.raises(CaptionerError, match=r"training diverged: the loss is nan at step 2; lower learning_rate, "
                                             r"set trainer.gradient_clip_val"):
        train(cfg)
    assert not list(Path(cfg.paths.run_dir).glob("**/*.ckpt"))  # no checkpoint of the NaN weights


def test_a_non_finite_validation_loss_stops_training_before_best_ckpt(cfg_factory):
    # the training loss is read on logging steps only (never here): validation after every step finds it
    cfg = cfg_factory(*DIVERGES, "trainer.log_every_n_steps=50", "trainer.val_check_interval=1")
    with pytest.raises(CaptionerError, match=r"training diverged: val/loss is nan after step 1"):
        train(cfg)
    assert not list(Path(cfg.paths.run_dir).glob("**/*.ckpt"))  # best.ckpt would keep the NaN weights, scored NaN
