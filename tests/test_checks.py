"""Non-finite and out-of-range numbers are refused by the checks, in one sentence, before any work (issue 25)."""
import pytest

from captioner.run import check_config
from captioner.utils import CaptionerError


@pytest.mark.parametrize("override, message", [
    ("learning_rate=inf", "learning_rate=inf must be a finite positive number"),
    ("learning_rate=nan", "learning_rate=nan must be a finite positive number"),
    ("weight_decay=inf", "weight_decay=inf must be a finite number >= 0"),
    ("length_penalty=-inf", "length_penalty=-inf must be a finite number"),
    ("max_len=1000000000", "max_len=1000000000 must be an integer from 1 to 1000"),
    ("scst.max_len=1000000000", "scst.max_len=1000000000 must be an integer from 1 to 1000"),
    # Lightning divides by these (a ZeroDivisionError in every process) or ignores a negative clip
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be a positive integer"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 must be a positive integer or null"),
    ("trainer.val_check_interval=0", r"trainer.val_check_interval=0 must be null, a positive integer \(steps\)"),
    ("trainer.val_check_interval=1.5", r"trainer.val_check_interval=1.5 must be null"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 must be a number >= 0 or null"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val=inf must be a finite number >= 0 or null"),
    ("data.image_size=1", "data.image_size=1 must be an integer >= 32 or null"),
])
def test_run_refuses_non_finite_and_out_of_range_numbers(cfg_factory, override, message):
    with pytest.raises(CaptionerError, match=message):
        check_config(cfg_factory(override))


@pytest.mark.parametrize("override", ["trainer.val_check_interval=0.5", "trainer.val_check_interval=3",
                                      "trainer.gradient_clip_val=1.0"])
def test_run_accepts_the_valid_trainer_values(cfg_factory, override):
    check_config(cfg_factory(override))


def test_caption_refuses_a_huge_max_len_before_loading_anything(tmp_path):
    from captioner.caption import main

    with pytest.raises(SystemExit, match="max_len=1000000000 must be an integer from 1 to 1000"):
        main([str(tmp_path), f"ckpt_path={tmp_path / 'none.ckpt'}", "max_len=1000000000"])
