"""Small shared helpers: the user-facing error type, image modes, atomic file writes (cache folders: captioner.caches)."""
import errno
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np


METRICS_FILE = "metrics.json"  # a training run's final metrics, in its run dir (read by the sweep table)


class CaptionerError(Exception):
    """A problem with the user's input or configuration, reported as one sentence (no stack trace)."""


def to_rgb(im):
    """A PIL image of any mode as 8-bit RGB. PIL's convert("RGB") clips 16- and 32-bit grayscale (I;16, I, F) at
    255, which turns a 16-bit photo white, so those are scaled to 0-255 first, by the range their values show
    (0-1 floats, 8-bit values in a wider type, else 16-bit): their files do not say it."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))  # one 4-byte copy of the pixels, scaled in place
        top = a.max(initial=0.0)
        a *= 255.0 if im.mode == "F" and top <= 1.0 else 1.0 if top <= 255 else 255.0 / 65535.0
        return Image.fromarray(np.clip(a, 0, 255, out=a).round(out=a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # RGBA, grayscale, palette, CMYK, 1-bit alike


@contextmanager
def write_errors(path):
    """A full disk or a folder we may not write, while writing `path`, as one sentence (not a traceback)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            where = next(p for p in [Path(path), *Path(path).parents] if p.exists())
            raise CaptionerError(f"Cannot write {path}: the disk is full ({shutil.disk_usage(where).free:,} bytes "
                                 f"free); free some space or choose a folder on another disk.") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CaptionerError(f"Cannot write {path} ({e.strerror}); choose a writable folder "
                                 f"(paths.cache_dir, paths.run_dir or data.root).") from None
        raise


def check_free_space(folder, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CaptionerError(f"{what} needs {needed:,} bytes in {folder} but only {free:,} are free; free some "
                             f"space or set paths.cache_dir to a folder on another disk.")


def _atomic(path, write) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # our own temporary name; gone already when the rename happened


def atomic_write_text(path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path, data, indent=1) -> None:
    """JSON as the standard has it: a NaN or inf in `data` is an error here (write null: `finite`), not a bare
    NaN that other JSON readers refuse."""
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False))


def finite(value):
    """A number (or 0-d tensor) as a float, or None when NaN or infinite: JSON's null."""
    value = float(value)
    return value if math.isfinite(value) else None


def atomic_copy(src, path) -> None:
    _atomic(path, lambda tmp: shutil.copyfile(src, tmp))


def atomic_save_npy(path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic(path, write)
