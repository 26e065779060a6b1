"""Serve a trained captioner: `python -m captioner.serve ckpt_path=outputs/.../last.ckpt port=8000`.

GET / is a page to caption an image in the browser. POST /api/caption takes a multipart `file` (optional form
fields `beam_size`, `n_best`) and answers {"captions": [{"caption", "probability"}, ...], "model": {...}}.
GET /health says whether the model is ready; /docs is FastAPI's OpenAPI page. Overrides are keys of conf/serve.yaml.

Requests arriving within `batch_window_ms` of each other share one encoder forward pass; inference runs in one
worker thread so the event loop keeps accepting (and rejecting) requests meanwhile.
"""
import asyncio
import contextlib
import io
import logging
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from captioner.cli import compose_config, one_line_errors
from captioner.inference import Captioner
from captioner.utils import CaptionerError

PAGE = Path(__file__).parent / "static" / "index.html"
MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries, headers and the small form fields
log = logging.getLogger(__name__)


class Batcher:
    """Collects queued requests for `window_ms` (or up to `max_batch`), then captions them in one encoder pass.

    Requests in one batch may ask for different decode options: their features are split by (beam_size, n_best)
    and each group gets its own beam search. `batches` counts encoder forward passes, `images` the images in them.
    """

    def __init__(self, captioner: Captioner, window_ms=10, max_batch=32, max_len=20):
        self.captioner, self.window, self.max_batch, self.max_len = captioner, window_ms / 1000, max_batch, max_len
        self.batches = self.images = 0
        self.task = self.queue = self.executor = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self):
        self.queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="captioner")  # one model, used by one thread
        self.task = asyncio.create_task(self._loop())

    async def stop(self):
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        while not self.queue.empty():  # answer whoever still waits, rather than leave them hanging
            _, _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def caption(self, image: Image.Image, beam_size: int, n_best: int):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, (beam_size, n_best), future))
        return await future

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            # let requests arriving meanwhile join this forward pass (a plain sleep: wait_for(queue.get()) can
            # lose an item when its timeout races the get on Python < 3.12)
            await asyncio.sleep(self.window)
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [item for item in batch if not item[2].done()]  # skip requests cancelled while queued
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as e:  # the worker itself must survive anything, or every later request would hang
                results = [e] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, batch):
        """-> per request, its captions or the exception that stopped them."""
        try:
            return self._caption([image for image, _, _ in batch], [options for _, options, _ in batch])
        except Exception as e:
            if len(batch) == 1:
                return [e]
            log.exception("batch of %d failed; retrying one by one", len(batch))
            return [self._run([item])[0] for item in batch]  # so one bad request does not fail its neighbours

    def _caption(self, images, options):
        features = self.captioner.features(images)
        self.batches += 1
        self.images += len(images)
        groups = defaultdict(list)
        for i, option in enumerate(options):
            groups[option].append(i)
        results = [None] * len(images)
        for (beam_size, n_best), index in groups.items():
            captions = self.captioner.caption_features(features[index], beam_size=beam_size, n_best=n_best,
                                                       max_len=self.max_len)
            for i, caps in zip(index, captions):
                results[i] = caps
        return results


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`, before they are read (Content-Length) or
    as soon as a streamed (chunked) body passes the limit, so nobody can fill the disk or memory with uploads."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            reason = "invalid Content-Length" if not length.isdigit() else self.too_large
            return await JSONResponse({"detail": reason}, 400 if not length.isdigit() else 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # raised inside FastAPI's body parsing, which turns it into the 413
                raise HTTPException(413, self.too_large)
            return message
        await self.app(scope, limited_receive, send)

    @property
    def too_large(self):
        return f"upload too large: the limit is {self.max_bytes - MULTIPART_SLACK} bytes"


def decode_image(data: bytes, max_pixels: float) -> Image.Image:
    """Upload bytes -> RGB image; the pixel count is checked from the header, before any pixel is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise HTTPException(413, f"image too large: {im.width}x{im.height} pixels, the limit is "
                                         f"{int(max_pixels)} pixels")
            im.load()
            return im.convert("RGB")
    except HTTPException:
        raise
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise HTTPException(415, "not an image: the file is not in any image format this server reads") from None
    except Exception as e:  # truncated or corrupt files raise all sorts (OSError, SyntaxError, EOFError, ...)
        raise HTTPException(400, f"the image could not be decoded: {type(e).__name__}: {e}") from None


def create_app(captioner: Captioner, cfg) -> FastAPI:
    """The web app around an already loaded captioner; `cfg` holds the keys of conf/serve.yaml."""
    batcher = Batcher(captioner, cfg.batch_window_ms, cfg.max_batch, cfg.max_len)
    max_bytes = int(cfg.max_upload_mb * 2**20)
    page = PAGE.read_text()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="captioner", summary="Show and Tell image captioning", lifespan=lifespan)
    app.state.captioner, app.state.batcher = captioner, batcher
    app.add_middleware(BodyLimit, max_bytes=max_bytes + MULTIPART_SLACK)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # still JSON, and the server goes on
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return page

    @app.get("/health")
    def health():
        """Whether the model is loaded and the batching worker runs; which checkpoint; how many forward passes."""
        body = {"ready": batcher.running, "checkpoint": str(captioner.ckpt_path), "device": str(captioner.device),
                "batches": batcher.batches, "images": batcher.images}
        return JSONResponse(body, 200 if batcher.running else 503)

    limit = Annotated[int, Form(ge=1, le=cfg.max_beam_size)]

    @app.post("/api/caption")
    async def caption(file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
                      beam_size: limit = cfg.beam_size, n_best: limit = cfg.n_best):
        """Caption one image: its `n_best` most likely captions, probabilities normalised over them."""
        if n_best > beam_size:
            raise HTTPException(422, f"n_best={n_best} must not exceed beam_size={beam_size}")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload too large: the limit is {max_bytes} bytes")
        image = await run_in_threadpool(decode_image, data, cfg.max_pixels)  # decoding is CPU work: off the loop
        if not batcher.running:
            raise HTTPException(503, "the model is not ready")
        try:
            captions = await batcher.caption(image, beam_size, n_best)
        except Exception as e:  # logged here; the client gets a JSON 500 and the server goes on
            log.exception("captioning failed")
            raise HTTPException(500, f"captioning failed: {type(e).__name__}") from None
        return {"captions": [{"caption": c, "probability": p} for c, p in captions], "model": captioner.info}

    return app


@one_line_errors
def main(argv=None):
    import uvicorn

    cfg = compose_config("serve", sys.argv[1:] if argv is None else argv)
    if not 1 <= cfg.n_best <= cfg.beam_size <= cfg.max_beam_size:
        raise CaptionerError(f"need 1 <= n_best ({cfg.n_best}) <= beam_size ({cfg.beam_size}) <= max_beam_size "
                             f"({cfg.max_beam_size}).")
    captioner = Captioner(cfg.ckpt_path, cfg.device)
    logging.getLogger(__name__).info("Serving %s on http://%s:%d", captioner.ckpt_path, cfg.host, cfg.port)
    uvicorn.run(create_app(captioner, cfg), host=cfg.host, port=cfg.port, access_log=cfg.access_log)


if __name__ == "__main__":
    main()
