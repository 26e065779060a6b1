"""Checking every key of a command before any work starts: type and range, one sentence naming the key.

Values come from Hydra overrides, so `beam_size=abc` arrives as the string "abc" and `learning_rate=1e-3` as a
float; booleans are never accepted where numbers are expected (`True` is an int in Python).
"""
import math
import uuid
from pathlib import Path

from captioner.checkpoint import check_device
from captioner.utils import CaptionerError

SEED_MAX = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit
MAX_LEN = 1000  # words per caption: decoding allocates max_len steps up front (1e9 asked for 24 GB)
SET_BY = {"max_epochs": "epochs", "max_steps": "iterations"}  # Trainer arguments with a top-level key


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float: NaN and inf pass every comparison a range check makes, or fail it silently."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def get_key(cfg, key):
    """cfg[key], where `key` may be dotted (data.image_size)."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key) if "." in key else cfg[key]


def integer(cfg, key, low=None, high=None, nullable=False):
    value = get_key(cfg, key)
    if value is None and nullable:
        return
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        where = ("an integer" if low is None and high is None else
                 "a positive integer" if low == 1 and high is None else
                 f"an integer >= {low}" if high is None else f"an integer from {low} to {high}")
        raise CaptionerError(f"{key}={value} must be {where}{' or null' if nullable else ''}.")


def number(cfg, key, positive=False, low=None, nullable=False):
    value = get_key(cfg, key)
    if value is None and nullable:
        return
    if not is_number(value) or (positive and not value > 0) or (low is not None and value < low):
        where = "a positive number" if positive else "a number" if low is None else f"a number >= {low}"
        if isinstance(value, float) and not math.isfinite(value):  # inf, NaN
            where = f"a finite {where[2:]}"
        raise CaptionerError(f"{key}={value} must be {where}{' or null' if nullable else ''}.")


def boolean(cfg, key):
    if not isinstance(cfg[key], bool):
        raise CaptionerError(f"{key}={cfg[key]} must be true or false.")


def text(cfg, key, nullable=False):
    value = cfg[key]
    if not (isinstance(value, str) and value) and not (value is None and nullable):
        raise CaptionerError(f"{key}={value} must be a non-empty string{' or null' if nullable else ''}.")


def existing_file(cfg, key, what):
    path = Path(str(cfg[key]))
    if path.is_dir():
        raise CaptionerError(f"{key}={path} is a folder; expected {what}.")
    if not path.is_file():
        raise CaptionerError(f"{key}={path} does not exist; expected {what}.")


def writable_file(path, key):
    """Results must never be lost to an unwritable output: try writing beside it now, before the work."""
    path = Path(str(path))
    if path.is_dir():
        raise CaptionerError(f"{key}={path} is a folder; expected a file name to write.")
    writable_dir(path.parent, key, shown=path)


def writable_dir(folder, key, shown=None):
    folder, shown = Path(str(folder)), shown or folder
    probe = folder / f".captioner-write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise CaptionerError(f"{key}={shown} cannot be written ({reason}: {e.filename or folder}); "
                             f"choose a writable place.") from None


def device(cfg, key="device"):
    check_device(cfg[key], key)


def decoding(cfg, max_beam_size=None):
    """beam_size, n_best, max_len, length_penalty, no_repeat_ngram_size, temperature, top_k, seed: what
    caption/evaluate/serve share."""
    integer(cfg, "beam_size", 1, max_beam_size)
    integer(cfg, "max_len", 1, MAX_LEN)
    if "length_penalty" in cfg:
        number(cfg, "length_penalty")
    if "no_repeat_ngram_size" in cfg:
        integer(cfg, "no_repeat_ngram_size", 0, MAX_LEN)
    if "temperature" in cfg:
        number(cfg, "temperature", positive=True, nullable=True)
        integer(cfg, "top_k", 0)
    if "seed" in cfg:  # the sampling seed (serve has none: it never samples)
        integer(cfg, "seed", 0, SEED_MAX)
    if "n_best" in cfg:
        integer(cfg, "n_best", 1)
        if cfg.n_best > cfg.beam_size:
            raise CaptionerError(f"n_best={cfg.n_best} must not exceed beam_size={cfg.beam_size} "
                                 f"(beam search keeps beam_size captions).")
        if cfg.get("temperature") is not None and cfg.n_best > 1:
            raise CaptionerError(f"n_best={cfg.n_best} needs beam search; with temperature={cfg.temperature} one "
                                 f"caption is sampled per image (use n_best=1).")


def check_caption(cfg):
    decoding(cfg)
    integer(cfg, "batch_size", 1)
    boolean(cfg, "attention")
    device(cfg)
    text(cfg, "ckpt_path")
    if cfg.output is not None:
        writable_file(cfg.output, "output")


def check_evaluate(cfg):
    integer(cfg, "max_images", 1, nullable=True)
    integer(cfg, "batch_size", 1)
    boolean(cfg, "spice")
    for key, what in (("results", 'a COCO results file ([{"image_id": ..., "caption": ...}])'),
                      ("annotations", "a COCO captions file")):
        if cfg[key] is not None:
            existing_file(cfg, key, what)
    if cfg.results is None:
        decoding(cfg)
        device(cfg)
        text(cfg, "ckpt_path")
        text(cfg, "split")
        if cfg.output_dir is not None:
            writable_dir(cfg.output_dir, "output_dir")
    if cfg.output is not None:
        writable_file(cfg.output, "output")


def check_download(cfg):
    text(cfg, "root")
    for key in ("base_url", "karpathy_url", "flickr8k_url"):
        text(cfg, key)
    number(cfg, "timeout", positive=True)
    integer(cfg, "retries", 0)
    for key in ("keep_zips", "progress"):
        boolean(cfg, key)
    parts = cfg.parts
    if isinstance(parts, str):
        parts = [parts]
    if not parts or not all(isinstance(p, str) for p in parts):
        raise CaptionerError(f"parts={cfg.parts} must be a non-empty list of part names.")


def check_serve(cfg):
    integer(cfg, "max_beam_size", 1)
    decoding(cfg, cfg.max_beam_size)
    text(cfg, "host")
    text(cfg, "ckpt_path")
    integer(cfg, "port", 0, 65535)
    device(cfg)
    number(cfg, "max_upload_mb", positive=True)
    number(cfg, "max_pixels", positive=True)
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS and cfg.max_pixels > 2 * Image.MAX_IMAGE_PIXELS:  # PIL refuses bigger images itself
        raise CaptionerError(f"max_pixels={cfg.max_pixels} is above PIL's own decompression-bomb limit "
                             f"({2 * Image.MAX_IMAGE_PIXELS} pixels), which refuses such images first; use at most "
                             f"that.")
    integer(cfg, "max_side", 1)
    number(cfg, "batch_window_ms", low=0)
    integer(cfg, "max_batch", 1)
    integer(cfg, "max_queue", 1)
    integer(cfg, "max_decoding", 1)
    number(cfg, "upload_timeout_s", positive=True)
    integer(cfg, "keep_alive_s", 1)
    boolean(cfg, "access_log")
