"""Small shared helpers: the user-facing error type, atomic file writes and cache keys."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np


class CaptionerError(Exception):
    """A problem with the user's input or configuration, reported as one sentence (no stack trace)."""


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npy(path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def file_fingerprint(path) -> dict:
    """Identity of an input file for cache keys: absolute path, size and modification time."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(spec: dict) -> str:
    """A short stable hash of everything a cached artefact depends on."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
