"""Cache folders and their keys: content fingerprints of input files, build-once folders (lock, build in a temporary
folder, rename) that record their files' sizes and CRC-32 and are verified on reuse, and never replace a folder
captioner did not make."""
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path

from filelock import FileLock

from captioner.utils import CaptionerError, atomic_write_text, write_errors

log = logging.getLogger(__name__)


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
                try:
                    atomic_write_text(record, _HASHES[stamp])
                except CaptionerError:
                    pass  # only saves hashing it again next time (a read-only or full cache folder)
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


OWNER = ".captioner.json"  # written first into every folder cached_dir builds: the proof that captioner made it, a
# generation id (new on every rebuild) and, once built, each file's size and CRC-32 (checked whenever it is reused)


def _crc(path: Path, st) -> int:
    stamp = ("crc", str(path), st.st_size, st.st_mtime_ns)
    if stamp not in _HASHES:  # once per process: zlib.crc32 reads ~1 GB/s from the page cache
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
        _HASHES[stamp] = crc
    return _HASHES[stamp]


def _owner(folder: Path) -> dict:
    """The folder's OWNER record; {} when there is none, None when it is unreadable (damaged)."""
    try:
        record = json.loads((folder / OWNER).read_text())
        return record if isinstance(record, dict) else None
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None


def generation(folder) -> str:
    """The id of the build of a cached folder ("" when absent): another one means it was rebuilt."""
    return (_owner(Path(folder)) or {}).get("generation", "")


def damage(folder: Path) -> str:
    """What differs from the sizes and checksums recorded when `folder` was built, or "" when nothing does
    (also for a folder built before they were recorded)."""
    record = _owner(folder)
    if record is None:
        return f"{OWNER}, its record of sizes and checksums, is unreadable"
    for name, (size, crc) in record.get("files", {}).items():
        try:
            st = (folder / name).stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != size:
            return f"{name} has {st.st_size:,} bytes instead of {size:,}"
        if _crc(folder / name, st) != crc:
            return f"{name} does not match its checksum"
    return ""


def _ours(folder: Path, marker: str, hint: str) -> bool:
    """Whether `folder` exists and may be removed: captioner made it (its OWNER file or its completion marker) or
    it is empty. Anything else stops the run: captioner deletes only what it can prove it created."""
    if not folder.exists():
        return False
    if folder.is_dir() and ((folder / OWNER).exists() or (folder / marker).exists() or not any(folder.iterdir())):
        return True
    raise CaptionerError(f"{folder} already exists and was not made by captioner, so it is left as it is; "
                         f"{hint or 'move it away or choose another folder'}.")


def cached_dir(out, build, marker: str = ".complete", is_complete=None, checksums=True, before_publish=None,
               hint="") -> Path:
    """The one way a cache folder is made: lock -> check -> build in a temporary folder -> rename.

    `build(tmp)` fills the temporary folder; the folder appears under its final name only when complete, so an
    interrupted build never looks finished, and concurrent processes (DDP ranks, sweep jobs) build it once: the
    others wait on the lock and then find it. Complete means `is_complete(folder)`, by default `folder/marker`
    exists; `build` must write the marker (or whatever `is_complete` checks) itself. With `checksums`, a complete
    folder whose files differ from those built is rebuilt (one warning). `before_publish()` may refuse the build
    (it raises) after `build`; `hint` ends the sentence refusing to replace a folder captioner did not make.
    """
    out = Path(out)
    done = is_complete or (lambda d: (d / marker).exists())
    if done(out) and not (checksums and damage(out)):
        return out
    tmp = out.with_name(out.name + ".tmp")
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{out}.lock"):
            if done(out):  # maybe another process built it while we waited
                if not (problem := checksums and damage(out)):
                    return out
                log.warning("The cache %s is damaged (%s); rebuilding it.", out, problem)
            _ours(out, marker, hint)  # refuse before building, not after
            if _ours(tmp, marker, hint):
                shutil.rmtree(tmp)  # left over from an interrupted build
            tmp.mkdir()
            (tmp / OWNER).write_text(json.dumps({"generation": uuid.uuid4().hex}))
            try:
                build(tmp)
                if before_publish:
                    before_publish()
                if checksums:
                    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != OWNER)
                    record = {str(p.relative_to(tmp)): [p.stat().st_size, _crc(p, p.stat())] for p in files}
                    atomic_write_text(tmp / OWNER, json.dumps({**_owner(tmp), "files": record}))
                if _ours(out, marker, hint):
                    shutil.rmtree(out)  # an incomplete, outdated or damaged folder of ours
                tmp.rename(out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
                raise
    return out
