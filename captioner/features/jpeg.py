"""JPEG decoding on the GPU for feature extraction: workers only read file bytes, the GPU decodes and resizes.

On an H200, 14 CPU workers decode ~1,900 COCO photos/s, whatever the encoder; nvJPEG (through
`torchvision.io.decode_jpeg(list_of_encoded, device="cuda")`) decodes a batch several times faster. Files it should
not get — not a JPEG, CMYK/other modes, no end-of-image marker (truncated) — are decoded by PIL in the worker
instead, so the skip-and-list policy for unreadable images is the same as on the CPU path.
"""
import io
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import InterpolationMode

from captioner.utils import to_rgb

EOI = b"\xff\xd9"


class ImageBytes(Dataset):
    """(encoded JPEG as a 1-D uint8 tensor, or a PIL-decoded [3, size, size] uint8 tensor, index, error or "")."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            data = Path(self.paths[i]).read_bytes()
            with Image.open(io.BytesIO(data)) as im:  # parses the header only
                if im.format == "JPEG" and im.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(EOI):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), i, ""
                return self.transform(to_rgb(im)), i, ""
        except Exception as e:  # any undecodable file is skipped, not fatal
            return torch.zeros(0, dtype=torch.uint8), i, f"{type(e).__name__}: {e}"


def as_lists(batch):
    """DataLoader collate: images of different sizes cannot be stacked before decoding."""
    data, idx, err = zip(*batch)
    return list(data), torch.tensor(idx), list(err)


def decode_batch(data, err, device, image_size, interpolation="bilinear"):
    """-> (uint8 [n, 3, size, size] on `device`, errors). Unreadable images get a blank row and their error."""
    err = list(err)
    out = torch.zeros(len(data), 3, image_size, image_size, dtype=torch.uint8, device=device)
    encoded = [k for k, x in enumerate(data) if x.dim() == 1 and x.numel()]
    decoded = []
    if encoded:
        try:
            decoded = decode_jpeg([data[k] for k in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode one at a time to find it
            decoded = [_decode_one(data[k], device) for k in encoded]
    mode = InterpolationMode(interpolation)
    for k, im in zip(encoded, decoded):
        if isinstance(im, str):
            err[k] = im
        else:
            out[k] = F.resize(im, [image_size, image_size], interpolation=mode, antialias=True)
    for k, x in enumerate(data):
        if x.dim() == 3:  # decoded by PIL in the worker
            out[k] = x.to(device, non_blocking=True)
    return out, err


def _decode_one(x, device):
    """nvJPEG first; what it rejects goes to PIL; what PIL rejects too is an error message."""
    try:
        return decode_jpeg(x, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(x.numpy().tobytes())) as im:
                return F.pil_to_tensor(to_rgb(im)).to(device)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
