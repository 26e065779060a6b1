"""Image features: run the frozen CNN once over every image of a split and cache the result on disk.

Cache layout (one folder per dataset split + encoder + preprocessing, so a changed setting never reuses it):
    <cache_dir>/features/<key>/features.npy   float16 (n_images, dim), or (n_images, N, dim) for grid features
                                              (<key> then says grid), memory-mapped when read
    <cache_dir>/features/<key>/image_ids.npy  int64, the row order
    <cache_dir>/features/<key>/meta.json      what produced it
    <cache_dir>/features/<key>/skipped.txt    unreadable images, one per line with the reason
    <cache_dir>/features/<key>/.captioner.json  each file's size and CRC-32, checked on reuse (captioner.utils)
The folder is written under a temporary name (<key>.tmp) and renamed when complete, under a lock file (<key>.lock)
so that concurrent runs extract once; a damaged one is extracted again.
"""
import errno
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from captioner.data.coco import CaptionSplit
from captioner.features.encoders import build_encoder, encoder_preprocessing, normalizing, resizing
from captioner.features.jpeg import ImageBytes, as_lists, decode_batch
from captioner.utils import CaptionerError, check_free_space, to_rgb, write_errors
from captioner.caches import cache_key, cached_dir, file_fingerprint, files_fingerprint

log = logging.getLogger(__name__)
MAX_WARNINGS = 20


class ImageFiles(Dataset):
    """(image tensor, index, error message or ""); `transform` turns a PIL RGB image into a tensor."""

    def __init__(self, paths, transform, image_size):
        self.paths, self.transform = paths, transform
        self.blank = (3, image_size, image_size)  # stands in for an unreadable image; its row is dropped

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                # to_rgb covers RGBA, grayscale of 1 to 32 bits, palette and CMYK alike
                return self.transform(to_rgb(im)), i, ""
        except Exception as e:  # any undecodable file is skipped, not fatal
            return torch.zeros(self.blank, dtype=torch.uint8), i, f"{type(e).__name__}: {e}"


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_plan(cores: int) -> tuple:
    """(forward threads, decoding workers) for extraction on the CPU. Decoding a 224-500 px JPEG costs a few
    percent of an EfficientNet-Lite0 forward, so one worker keeps up with several cores of forward; on 2-3 cores it
    shares a core with the forward (it mostly waits), on 1 core the main process decodes between batches."""
    if cores <= 1:
        return 1, 0
    workers = max(1, cores // 8)
    return (cores if cores < 4 else cores - workers), workers


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def preprocess_spec(encoder_cfg, image_size=None, kind="pooled") -> dict:
    """Everything needed to turn an image into encoder input; saved with features and in checkpoints.
    Size, mean, std and interpolation are the encoder's own (timm models: timm's config); `image_size` overrides.
    `kind` "grid" (a model's feature_kind) adds features: grid; pooled specs keep their old keys and caches."""
    own = encoder_preprocessing(encoder_cfg)
    spec = {"encoder": encoder_cfg.name,
            "weights": str(encoder_cfg.weights) if encoder_cfg.get("weights") else "default",
            "image_size": int(image_size or own["image_size"]), "mean": own["mean"], "std": own["std"],
            "interpolation": own["interpolation"]}
    return with_kind(spec, kind)


def with_kind(spec: dict, kind: str) -> dict:
    """`spec` for features of `kind` ("pooled" or "grid")."""
    spec = {k: v for k, v in spec.items() if k != "features"}
    return {**spec, "features": "grid"} if kind == "grid" else spec


def is_grid(spec: dict) -> bool:
    return spec.get("features") == "grid"


def feature_dir(cache_dir, split: CaptionSplit, spec: dict) -> Path:
    """Keyed by content: the annotation file's bytes and the split's image names and sizes, not their location,
    so a copied or moved data folder keeps its features."""
    spec = {"interpolation": "bilinear", **spec}  # checkpoints from before interpolation was recorded
    weights = spec.get("weights", "default")
    if weights != "default" and Path(weights).is_file():  # a .pth file's bytes: new weights at the same path count
        spec = {**spec, "weights": file_fingerprint(weights, cache_dir)}
    key = cache_key({"spec": spec, "annotations": file_fingerprint(split.annotation_file, cache_dir),
                     "images": files_fingerprint(split.image_dir, split.files), "split": split.name})
    return Path(cache_dir) / "features" / f"{split.name}-{spec['encoder']}{'-grid' if is_grid(spec) else ''}-{key}"


def load_features(folder: Path):
    """(features memmap float16 [n, dim] or [n, N, dim], image_ids int64 [n])."""
    return np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "image_ids.npy")


def _compact(src: np.ndarray, keep: np.ndarray, path: Path, rows=16384):
    """Write src[keep] to a new .npy a slice at a time, so a COCO-sized array never has to fit in memory."""
    out = _feature_file(path, len(keep), src.shape[1:], f"Leaving out unreadable images from {path.parent}")
    for s in range(0, len(keep), rows):
        out[s:s + rows] = src[keep[s:s + rows]]
    out.flush()


def extract_split(split: CaptionSplit, encoder_cfg, cache_dir, image_size=None, batch_size=64,
                  num_workers=2, device=None, encoder=None, spec=None, gpu_decode=None, before_publish=None,
                  kind="pooled") -> Path:
    """Extract (or find cached) features for one split; returns the cache folder. `spec` (a checkpoint's
    preprocessing, its feature kind included) replaces encoder_cfg + image_size + kind ("pooled" or "grid", the
    model's feature_kind); `gpu_decode` (default: on CUDA) decodes JPEGs on the device.
    `before_publish()` may refuse the features (it raises), e.g. when the dataset was rebuilt meanwhile."""
    spec = spec or preprocess_spec(encoder_cfg, image_size, kind)
    out = feature_dir(cache_dir, split, spec)
    return cached_dir(out, lambda tmp: _extract(split, spec, encoder_cfg, tmp, batch_size, num_workers, device,
                                                 encoder, gpu_decode), marker="meta.json",
                      before_publish=before_publish)


def _feature_file(path: Path, n: int, shape: tuple, what: str):
    """The memory-mapped float16 [n, *shape] file, its disk space reserved first: a full disk under a memory map
    kills the process (SIGBUS) with no message, so it must fail here, as one sentence."""
    needed = n * int(np.prod(shape)) * 2 + 4096  # float16 rows and the .npy header
    check_free_space(path.parent, needed, what)
    out = np.lib.format.open_memmap(path, "w+", np.float16, (n, *shape))
    try:
        with write_errors(path), open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except (AttributeError, OSError) as e:  # not on macOS, nor on some file systems: the space check must do
        if isinstance(e, OSError) and e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    return out


def _extract(split, spec, encoder_cfg, tmp, batch_size, num_workers, device, encoder, gpu_decode):
    out = tmp.with_name(tmp.name[:-len(".tmp")])  # the final folder, for messages
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log.info("Extracting %s features for %d images of %s into %s", spec["encoder"], len(split.image_ids),
             split.image_dir, out)
    # channels-last: the faster convolution kernels on both devices (CPU: 1.2-1.5x for EfficientNet-Lite0); the
    # features differ from the contiguous path by one float16 step at most (2e-3), so the cache key stays
    encoder = (encoder or build_encoder(encoder_cfg, grid=is_grid(spec))).to(device, memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if not cuda:  # decode workers competing with the forward's threads for the cores slow it (2 cores: 1.4-1.7x)
        threads, workers = cpu_plan(usable_cores())
        threads, num_workers = min(threads, torch.get_num_threads()), min(num_workers, workers)
    # workers decode and resize (overlapping the forward pass) and hand over uint8: a quarter of the bytes to pass
    # between processes and to the GPU (pinned memory: an async copy); normalising is one batched op on the device.
    # On CUDA the workers only read the files and the GPU decodes the JPEGs (CPU decoding caps it at ~1,900/s).
    size, interpolation = spec["image_size"], spec.get("interpolation", "bilinear")
    gpu_decode = cuda if gpu_decode is None else gpu_decode
    paths = [split.image_dir / f for f in split.files]
    files = ImageBytes(paths, resizing(size, interpolation)) if gpu_decode else \
        ImageFiles(paths, resizing(size, interpolation), size)
    loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, pin_memory=cuda,
                        collate_fn=as_lists if gpu_decode else None)
    normalize = normalizing(spec["mean"], spec["std"])
    feats = None
    failures = []
    start = time.perf_counter()
    # logging_redirect_tqdm: warnings print on their own lines, not into the progress bar
    with torch.inference_mode(), torch_threads(threads), logging_redirect_tqdm(), \
            tqdm(total=len(files), desc=f"features {split.name}", unit="img") as bar:
        for x, idx, err in loader:
            if gpu_decode:
                x, err = decode_batch(x, err, device, size, interpolation)
            x = normalize(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                y = encoder(x).float()
            if feats is None:
                feats = _feature_file(tmp / "all.npy", len(files), y.shape[1:], f"Extracting {split.name} "
                                      f"features ({len(files)} images x {' x '.join(map(str, y.shape[1:]))})")
            feats[idx.numpy()] = y.cpu().numpy().astype(np.float16)
            for i, e in zip(idx.tolist(), err):
                if e:
                    failures.append((i, e))
                    if len(failures) <= MAX_WARNINGS:
                        log.warning("Skipping unreadable image %s (%s)", files.paths[i], e)
                    if len(failures) == MAX_WARNINGS:
                        log.warning("Further unreadable images are only listed in %s", out / "skipped.txt")
            bar.update(len(idx))
    keep = np.setdiff1d(np.arange(len(files)), [i for i, _ in failures])  # rows of the readable images
    if len(keep) == 0:
        raise CaptionerError(f"No image of split '{split.name}' could be read; expected the image files named in "
                             f"{split.annotation_file} under {split.image_dir}.")
    feats.flush()
    if failures:
        log.warning("%d of %d images of %s could not be read and are left out; list in %s", len(failures),
                    len(files), split.name, out / "skipped.txt")
        (tmp / "skipped.txt").write_text("".join(f"{files.paths[i]}\t{e}\n" for i, e in failures))
        _compact(feats, keep, tmp / "features.npy")
        del feats
        (tmp / "all.npy").unlink()
    else:
        del feats
        (tmp / "all.npy").rename(tmp / "features.npy")
    np.save(tmp / "image_ids.npy", np.asarray(split.image_ids, dtype=np.int64)[keep])
    elapsed = time.perf_counter() - start
    meta = dict(spec, split=split.name, gpu_decode=bool(gpu_decode), channels_last=True, threads=threads,
                workers=num_workers, annotations=str(split.annotation_file),
                images=str(split.image_dir),
                n_images=int(len(keep)), skipped=len(failures), seconds=round(elapsed, 2),
                images_per_s=round(len(files) / elapsed, 1))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
