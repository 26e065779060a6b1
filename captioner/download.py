"""Download MS-COCO 2017 and Karpathy's split files: `python -m captioner.download [root=data/coco] [parts=[...]]`,
or Flickr8k: `python -m captioner.download data=flickr8k` (its images and dataset_flickr8k.json).

Arguments are overrides of conf/download.yaml. Each part is fetched to `<root>/<zip>.part` (resumed with an HTTP
Range request), checked against its size and (official files) MD5, extracted into a hidden temporary folder and
renamed into place with a `.complete` marker inside, so a folder without it never passes as complete and a rerun
skips finished parts without a request. Only zips this run fetched, and its own temporary folders, are removed.
"""
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from captioner import checks
from captioner.cli import compose_config, one_line_errors, show_help
from captioner.utils import CaptionerError

log = logging.getLogger(__name__)

# Part (what appears in root) -> (the config key of its URL, the zip's path below that URL, what of the zip becomes
# root/<part>: a folder, a single file, or None: all its files, without their folder).
PARTS = {"caption_datasets": ("karpathy_url", "", None),
         "annotations": ("base_url", "annotations/annotations_trainval2017.zip", "annotations"),
         "train2017": ("base_url", "zips/train2017.zip", "train2017"),
         "val2017": ("base_url", "zips/val2017.zip", "val2017"),
         # Flickr8k (data=flickr8k): the photos of the public mirror most code uses (the zip's folder name is
         # misspelt as published), and the Karpathy split file, both in the layout that data=flickr8k reads
         "images": ("flickr8k_url", "Flickr8k_Dataset.zip", "Flicker8k_Dataset"),
         "dataset_flickr8k.json": ("karpathy_url", "", "dataset_flickr8k.json")}
OFFICIAL = "http://images.cocodataset.org"
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
# Sizes and MD5s of the official zips, as published by many independent download scripts (PaddleDetection,
# MLPerf, torchvision-style loaders). Keyed by URL: a mirror or a test server may serve other bytes.
KNOWN = {f"{OFFICIAL}/annotations/annotations_trainval2017.zip": (252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
         f"{OFFICIAL}/zips/train2017.zip": (19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
         f"{OFFICIAL}/zips/val2017.zip": (815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
         # MD5 as published by torchvision's R port (mlverse/torchdatasets); its size is not published
         KARPATHY: (None, "4fa8c08369d22fe16e41dc124bd1adc2"),
         # MD5 as published by the same R port (its sizes are not published, and cannot be fetched from here)
         f"{FLICKR8K}/Flickr8k_Dataset.zip": (None, "f18a1e2920de5bd84dae7cf08ec78978")}
MARKER = ".complete"
OWNED = ".captioner-extracting"  # written first into a temporary extraction folder: only such a one is removed
CHUNK = 1 << 20


class _Interrupted(Exception):
    """A transfer that broke off (network error, short read): worth resuming."""


def _read(resp, url) -> bytes:
    try:
        return resp.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete chunked body
        raise _Interrupted(f"the transfer of {url} broke off ({e})") from None


def _transfer(url, part: Path, timeout, expected, progress):
    """Append the rest of `url` to `part`; restart from byte 0 when the server cannot continue it."""
    have = part.stat().st_size if part.exists() else 0
    if expected is not None and have >= expected:
        if have == expected:
            return  # finished earlier; the verification and rename were all that was missing
        part.unlink()  # longer than the real file: cannot be a prefix of it
        have = 0
    headers = {"User-Agent": "captioner-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # our .part is not a prefix of what the server has now: start over
            part.unlink()
            return _transfer(url, part, timeout, expected, progress)
        if e.code >= 500:
            raise _Interrupted(f"{url} answered HTTP {e.code} {e.reason}") from None
        raise CaptionerError(f"could not download {url}: the server answered HTTP {e.code} {e.reason}; "
                             f"expected the zip file there (check base_url).") from None
    except (URLError, OSError, http.client.HTTPException) as e:
        raise _Interrupted(f"could not reach {url} ({getattr(e, 'reason', e)})") from None
    with resp:
        start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        if resp.status == 206 and start and int(start.group(1)) == have:
            mode = "ab"
        elif resp.status == 200:  # no Range asked, or the server ignored it: what comes is the whole file
            if have:
                log.info("%s does not support resuming; starting over.", url)
            mode, have = "wb", 0
        else:
            raise CaptionerError(f"{url} answered HTTP {resp.status} with Content-Range "
                                 f"'{resp.headers.get('Content-Range')}'; expected the bytes from {have} on.")
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected
        if expected is not None and total != expected:
            raise CaptionerError(f"{url} is {total} bytes but the official file is {expected} bytes; "
                                 f"check base_url.")
        try:
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=part.name[:-5], disable=not progress) as bar:
                while chunk := _read(resp, url):
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:  # only writing gets here (disk full, permissions): resuming would not help
            raise CaptionerError(f"writing {part} failed: {e}.") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Interrupted(f"the transfer of {url} stopped at {size} of {total} bytes")


def _md5(path: Path, progress) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"md5 {path.name}", disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def fetch(url, dest: Path, timeout=60, retries=3, progress=True) -> Path:
    """Download `url` to `dest` (resuming `dest`.part), verified; `dest` exists only once it is right."""
    expected, md5 = KNOWN.get(url, (None, None))
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, expected, progress)
            break
        except _Interrupted as e:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                hint = f"to resume ({kept} bytes are kept in {part})" if kept else "to retry"
                raise CaptionerError(f"{e}; run the same command again {hint}.") from None
            log.warning("%s; resuming in %d s", e, 2 ** attempt)
            time.sleep(2 ** attempt)
    if md5 is not None and (actual := _md5(part, progress)) != md5:
        part.unlink()  # complete but wrong: resuming it could never fix it
        raise CaptionerError(f"{url} arrived with MD5 {actual} but the official file has {md5}; the download "
                             f"was deleted, run again to fetch it afresh.")
    os.replace(part, dest)
    return dest


def _fresh_tmp(tmp: Path) -> None:
    """An empty temporary folder, marked as ours: only a marked one (an interrupted extraction) is ever removed."""
    if tmp.exists():
        if not (tmp / OWNED).exists():
            raise CaptionerError(f"{tmp} exists but was not made by captioner.download; move it away and run again.")
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / OWNED).touch()


def extract(zip_path: Path, root: Path, name: str, url: str, source, progress=True, fetched=True) -> Path:
    """Unzip `source` of `zip_path` into root/name, all or nothing: a folder (with the completion marker inside), a
    single file, or (source None) all the zip's files, without their folder. A bad archive is deleted only if
    this run `fetched` it."""
    _fresh_tmp(tmp := root / f".{name}.extracting")
    what = "any file" if source is None else f"{source}"
    try:
        with zipfile.ZipFile(zip_path) as z:
            members = [m for m in z.infolist() if not m.is_dir() if source is None
                       or m.filename == source or m.filename.startswith(f"{source}/")]
            if not members:
                raise zipfile.BadZipFile(f"it has no {what}")
            for m in tqdm(members, desc=f"extracting {zip_path.name}", unit="files", disable=not progress):
                z.extract(m, tmp / name if source is None else tmp)  # CRC-checked as read
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not fetched:
            raise CaptionerError(f"{zip_path} (not downloaded by this run) is not a valid zip archive with {what} "
                                 f"({e}); it was left in place: delete or replace it and run again.") from None
        zip_path.unlink()  # a bad archive cannot be repaired by resuming; the next run fetches it afresh
        raise CaptionerError(f"{zip_path} (from {url}) is not a valid zip archive with {what} ({e}); "
                             f"it was deleted, run again to download it afresh.") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CaptionerError(f"extracting {zip_path} into {tmp} failed: {e}.") from None
    out = tmp / (name if source is None else source)
    if out.is_dir():
        (out / MARKER).write_text(json.dumps({"url": url, "files": len(members)}))
    os.rename(out, root / name)  # atomic on one file system: the part appears complete or not at all
    shutil.rmtree(tmp)
    return root / name


def complete(target: Path) -> bool:
    return (target / MARKER).exists() or target.is_file()  # a file part only ever appears complete


def download(root, parts=tuple(PARTS), base_url=OFFICIAL, timeout=60, retries=3, keep_zips=False,
             progress=True, karpathy_url=KARPATHY, flickr8k_url=FLICKR8K) -> Path:
    root = Path(os.path.normpath(root))  # data=flickr8k downloads into <data.root>/..
    parts = [parts] if isinstance(parts, str) else list(parts)
    for name in parts:
        if name not in PARTS:
            raise CaptionerError(f"unknown part '{name}'; choose from {', '.join(PARTS)}.")
        target = root / name
        if target.exists() and not complete(target):
            # Checked before any download: someone else's (or a hand-made) folder is never overwritten.
            raise CaptionerError(f"{target} exists but has no {MARKER} marker, so it may be incomplete; move it "
                                 f"away (or create {target / MARKER} if you know it is complete) and run again.")
    bases = {"base_url": base_url, "karpathy_url": karpathy_url, "flickr8k_url": flickr8k_url}
    urls = {name: f"{bases[PARTS[name][0]].rstrip('/')}/{PARTS[name][1]}".rstrip("/") for name in parts}
    zips = {name: root / urls[name].rsplit("/", 1)[-1] for name in parts}
    root.mkdir(parents=True, exist_ok=True)
    fetched = set()
    for i, name in enumerate(parts):
        if complete(root / name):
            log.info("%s is complete; skipping.", root / name)
            continue
        url, zip_path = urls[name], zips[name]
        if not zip_path.exists():  # a zip under its final name has already been verified (or was put there)
            log.info("Downloading %s", url)
            fetch(url, zip_path, timeout, retries, progress)
            fetched.add(zip_path)
        extract(zip_path, root, name, url, PARTS[name][2], progress, fetched=zip_path in fetched)
        if not keep_zips and zip_path in fetched and zip_path not in [zips[p] for p in parts[i + 1:]]:
            zip_path.unlink()  # only a zip this run downloaded (caption_datasets.zip serves 2 parts)
        log.info("%s is ready.", root / name)
    return root


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, "download"):
        return
    if bad := [a for a in argv if "=" not in a]:
        raise CaptionerError(f"unexpected argument {bad[0]!r}; usage: python -m captioner.download [key=value ...].")
    cfg = compose_config("download", argv)
    checks.check_download(cfg)  # every key before any request (part names: download checks them against PARTS)
    root = download(cfg.root, cfg.parts, cfg.base_url, cfg.timeout, cfg.retries, cfg.keep_zips, cfg.progress,
                    cfg.karpathy_url, cfg.flickr8k_url)
    log.info("%s (%s) is in %s.", cfg.data.name, ", ".join(map(str, cfg.parts)), root)


if __name__ == "__main__":
    main()
