"""What the non-training commands share: composing a config from `key=value` arguments, one-line errors."""
import functools
import logging
import sys

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from captioner.checks import SET_BY
from captioner.utils import CaptionerError


def compose_config(name: str, overrides):
    """The packaged config `name` with Hydra overrides applied (no run directory, no logging set-up)."""
    with initialize_config_module("captioner.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def show_help(argv, doc: str, config: str = None) -> bool:
    """For -h/--help: print the command's docstring and, when it has its own, its config file with the comments
    that explain each key (what `python -m captioner.run --help` gets from Hydra). True when help was asked for."""
    if not any(a in ("-h", "--help") for a in argv):
        return False
    print(doc.strip())
    if config:
        from importlib.resources import files

        print(f"\n== Keys (key=value overrides of conf/{config}.yaml) ==\n")
        print(files("captioner.conf").joinpath(f"{config}.yaml").read_text(encoding="utf-8").strip())
    return True


def one_line(error) -> str:
    """An error as one sentence. Hydra's messages run to several lines: keep the first, plus the part a user needs
    (the available options of a config group)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    if first.startswith("Could not override") and "is not in struct" in f"{error} {error.__cause__}":
        key = first.split("'")[1] if first.count("'") >= 2 else ""
        group, _, name = key.partition(".")
        if group == "trainer" and name in SET_BY:
            return f"{first.rstrip('.')}: it is set by the top-level key {SET_BY[name]}; use {SET_BY[name]}=<n>."
        if group == "trainer":  # conf/trainer/ lists the common arguments; Lightning's Trainer takes more
            return (f"{first.rstrip('.')}: there is no such key; check its spelling, or add another argument of "
                    f"Lightning's Trainer with +{key}=<value>.")
        return f"{first.rstrip('.')}: there is no such key; check its spelling."
    options = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
    if options is not None:
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        return f"{first}; expected one of: {', '.join(lines[options + 1:end])}."
    return first


def one_line_errors(fn):
    """Report user errors (bad paths, bad overrides) as one sentence and exit 1, never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return fn(*args, **kwargs)
        except (CaptionerError, HydraException, OmegaConfBaseException) as e:
            sys.exit(f"error: {one_line(e)}")
    return wrapper
