"""Small shared helpers: the user-facing error type, atomic file writes, cache keys and cache folders."""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock


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


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path, data, indent=1) -> None:
    """JSON as the standard has it: a NaN or inf in `data` is an error here (write null: `finite`), not a bare
    NaN that other JSON readers refuse."""
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False))


def finite(value):
    """A number (or 0-d tensor) as a float, or None when NaN or infinite: JSON's null."""
    value = float(value)
    return value if math.isfinite(value) else None


def atomic_copy(src, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)


def atomic_save_npy(path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


_HASHES: dict = {}  # (path, size, mtime_ns) -> digest, for this process


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path, cache_dir=None) -> dict:
    """Identity of an input file for cache keys: a hash of its bytes and its size, so a copied or moved file (or
    a `touch`) keeps its caches and an edited one does not. Hashing a 90 MB file takes ~0.2 s; the result is kept
    in <cache_dir>/hashes/ under the file's path, size and mtime, so later runs only stat the file."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp not in _HASHES:
        record = Path(cache_dir) / "hashes" / f"{cache_key(list(stamp))}.txt" if cache_dir else None
        if record is not None and record.is_file():
            _HASHES[stamp] = record.read_text().strip()
        else:
            _HASHES[stamp] = _digest(path)
            if record is not None:
                atomic_write_text(record, _HASHES[stamp])
    return {"blake2b": _HASHES[stamp], "size": st.st_size}


def files_fingerprint(folder, names) -> dict:
    """Identity of a set of image files for cache keys: their names relative to `folder` and their sizes (-1 when
    missing), not where the folder lives. Only stats the files: reading 123k images per run would take minutes."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(folder)
    for name in names:
        try:
            size = os.stat(folder / name).st_size
        except OSError:
            size = -1
        h.update(f"{name}\t{size}\n".encode())
    return {"files": len(names), "names_and_sizes": h.hexdigest()}


def cache_key(spec: dict) -> str:
    """A short stable hash of everything a cached artefact depends on."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_dir(out, build, marker: str = ".complete", is_complete=None) -> Path:
    """The one way a cache folder is made: lock -> check -> build in a temporary folder -> rename.

    `build(tmp)` fills the temporary folder; the folder appears under its final name only when complete, so an
    interrupted build never looks finished, and concurrent processes (DDP ranks, sweep jobs) build it once: the
    others wait on the lock and then find it. Complete means `is_complete(folder)`, by default `folder/marker`
    exists; `build` must write the marker (or whatever `is_complete` checks) itself.
    """
    out = Path(out)
    done = is_complete or (lambda d: (d / marker).exists())
    if done(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if done(out):  # another process built it while we waited
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted build
        tmp.mkdir()
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete or outdated folder
        tmp.rename(out)
    return out
