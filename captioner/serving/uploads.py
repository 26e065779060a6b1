"""What the server accepts: a bounded request body, and images decoded only when their size is within limits.

Both answer with an HTTP error the client can read: the body limit drains an over-limit body (up to a bound)
before it answers 413, because a server that answers while the client is still sending and then closes the
connection makes most clients (urllib, httpx, browsers) see a connection reset instead of the 413.
"""
import io
import re

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from captioner.utils import to_rgb

MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries, headers and the small form fields
DRAIN_LIMIT = 64 * 2**20  # read and discard at most this much of an over-limit body; beyond it, answer and close


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`, decided from Content-Length or, for a streamed
    (chunked) body, as soon as it passes the limit; nobody can fill the disk or memory with uploads."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
        if int(length) > self.max_bytes:
            return await self.refuse(scope, receive, send, 0)
        received, over, rest = 0, False, True  # rest: whether more of the body may follow

        async def limited_receive():
            nonlocal received, over, rest
            message = await receive()
            received += len(message.get("body", b""))
            rest = message["type"] == "http.request" and message.get("more_body", False)
            if received > self.max_bytes:
                over = True
                raise HTTPException(413, self.too_large)  # stops FastAPI's body parsing
            return message

        async def watched_send(message):
            nonlocal over
            if message["type"] == "http.response.start" and over and rest:
                over = False
                await self.drain(receive, received)  # let the client finish sending before it reads the answer
            await send(message)
        await self.app(scope, limited_receive, watched_send)

    async def refuse(self, scope, receive, send, received):
        drained = await self.drain(receive, received)
        headers = None if drained else {"Connection": "close"}
        await JSONResponse({"detail": self.too_large}, 413, headers=headers)(scope, receive, send)

    @staticmethod
    async def drain(receive, received) -> bool:
        """Read and discard the rest of the body, up to DRAIN_LIMIT bytes; -> whether it was all read."""
        while received <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return False  # the client went away
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    @property
    def too_large(self):
        return f"upload too large: the limit is {self.max_bytes - MULTIPART_SLACK} bytes"


# the formats the page offers (a phone's MPO photo opens as JPEG), not all PIL knows: EPS would run Ghostscript
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")


# a progressive JPEG's decode time grows with its scans x pixels: 1,500 repeats of one scan in 400 KB held a decode
# slot for 32 s. Encoders write at most ~12 (libjpeg's progressive script: 10); libjpeg-turbo has a scan limit too.
MAX_SCANS = 32


def jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) in JPEG bytes. Entropy-coded data never holds FF DA (its FF bytes are
    followed by 00 or a restart marker), so this counts only scans, plus any in an embedded EXIF thumbnail."""
    return data.count(b"\xff\xda")


def too_large(detail):
    return HTTPException(413, f"image too large: {detail}")


def decode_image(data: bytes, max_pixels: float, max_side: int, size: int = 224) -> Image.Image:
    """Upload bytes -> RGB image no larger than needed for an encoder input of `size` x `size`.

    The header's width and height are checked against `max_side` and `max_pixels` before any pixel is decoded;
    JPEGs are decoded at a reduced scale (`Image.draft`), and big images are box-reduced right away, so what waits
    in the batching queue is small.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size
            if max(w, h) > max_side:
                raise too_large(f"{w}x{h} pixels, the limit is {max_side} pixels on the longer side")
            if w * h > max_pixels:
                raise too_large(f"{w}x{h} pixels, the limit is {int(max_pixels)} pixels")
            scans = jpeg_scans(data) if im.format in ("JPEG", "MPO") else 0
            if scans > MAX_SCANS:
                raise HTTPException(422, f"the JPEG has {scans} scans, the limit is {MAX_SCANS} "
                                         f"(photos have at most about 12); save it again as a plain JPEG")
            im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
            im.load()
            factor = (max(1, im.width // (2 * size)), max(1, im.height // (2 * size)))
            return to_rgb(im if factor == (1, 1) else reduce(im, factor))  # the encoder squashes to size x size
    except HTTPException:
        raise
    except Image.DecompressionBombError as e:  # beyond PIL's own limit: quote ours, not PIL's
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise too_large(f"{pixels.group(1) if pixels else 'too many'} pixels, the limit is {int(max_pixels)} "
                        f"pixels") from None
    except UnidentifiedImageError:
        raise HTTPException(415, "not an image: the file is not in any image format this server reads") from None
    except Exception as e:  # truncated or corrupt files raise all sorts (OSError, SyntaxError, EOFError, ...)
        raise HTTPException(400, f"the image could not be decoded: {type(e).__name__}: {e}") from None


def reduce(im: Image.Image, factor) -> Image.Image:
    """Box-reduce `im` by `factor`, a band of rows at a time: converting the whole image (RGBA's premultiplied
    copy inside Image.reduce, 16 to 32 bits, CMYK or palette to RGB) would copy all its pixels once more."""
    fx, fy = factor
    out, band = None, 16 * fy
    for y in range(0, im.height, band):
        strip = im.crop((0, y, im.width, min(y + band, im.height)))
        if strip.mode.startswith("I;16"):  # reduce needs one of its modes: 16-bit goes to 32-bit
            strip = strip.convert("I")
        # to_rgb scales 32-bit pixels by the range they show: done once, on the reduced whole, not per band
        strip = strip if strip.mode in ("L", "RGB", "RGBA", "LA", "I", "F") else to_rgb(strip)
        strip = strip.reduce(factor)
        out = out or Image.new(strip.mode, (-(-im.width // fx), -(-im.height // fy)))
        out.paste(strip, (0, y // fy))
    return out
