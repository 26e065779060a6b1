"""What the non-training commands share: composing a config from `key=value` arguments, one-line errors."""
import functools
import logging
import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from captioner.utils import CaptionerError


def compose_config(name: str, overrides):
    """The packaged config `name` with Hydra overrides applied (no run directory, no logging set-up)."""
    with initialize_config_module("captioner.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def one_line_errors(fn):
    """Report user errors (bad paths, bad overrides) as one sentence and exit 1, never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return fn(*args, **kwargs)
        except (CaptionerError, HydraException, OmegaConfBaseException) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sys.exit(f"error: {message}")
    return wrapper
