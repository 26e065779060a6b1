"""Serve a trained captioner: `python -m captioner.serve ckpt_path=outputs/.../last.ckpt port=8000`.

GET / is a page to caption an image in the browser. POST /api/caption takes a multipart `file` (optional form
fields `beam_size`, `n_best`) and answers {"captions": [{"caption", "probability"}, ...], "model": {...}}. With an
attention model each caption also has "attention": {"words": its words and <end>, "grid": [H, W], "maps": per word
its weights over the H x W grid, row-major, 3 decimals}; the page draws them over the image.
GET /health says whether the model is ready; /docs is FastAPI's OpenAPI page. Overrides are keys of conf/serve.yaml.

Requests arriving within `batch_window_ms` of each other share one encoder forward pass; inference runs in one
worker thread so the event loop keeps accepting (and rejecting) requests meanwhile. Memory stays bounded: at most
`max_decoding` uploads are decoded at once, images are refused from their header when too large (see
captioner/serving/uploads.py), and past `max_queue` + `max_decoding` uploads in flight a request gets 503 with
Retry-After before its body is read (captioner/serving/admission.py).
"""
import asyncio
import contextlib
import logging
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from captioner import checks
from captioner.cli import compose_config, one_line_errors, show_help
from captioner.evaluation.attention import END_WORD, grid_shape
from captioner.models.decoding import decode_options
from captioner.serving.admission import Admission, HeaderTimeout
from captioner.serving.inference import Captioner
from captioner.serving.uploads import MULTIPART_SLACK, BodyLimit, decode_image

PAGE = Path(__file__).parent / "serving" / "static" / "index.html"
log = logging.getLogger(__name__)


class Batcher:
    """Collects queued requests for `window_ms` (or up to `max_batch`), then captions them in one encoder pass.

    Requests in one batch may ask for different decode options: their features are split by (beam_size, n_best)
    and each group gets its own beam search. The other options (`decode`: max_len, length_penalty, temperature,
    top_k) are the server's. `batches` counts encoder forward passes, `images` the images in them.
    """

    def __init__(self, captioner: Captioner, window_ms=10, max_batch=32, decode=None, max_queue=64):
        self.captioner, self.window, self.max_batch = captioner, window_ms / 1000, max_batch
        self.decode = dict(decode or {})
        self.max_queue = max_queue
        self.batches = self.images = 0
        self.task = self.queue = self.executor = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self):
        self.queue = asyncio.Queue(self.max_queue)
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
        try:
            self.queue.put_nowait((image, (beam_size, n_best), future))
        except asyncio.QueueFull:
            raise HTTPException(503, f"the server is busy ({self.max_queue} images are waiting); retry shortly",
                                headers={"Retry-After": "1"}) from None
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
                                                       **self.decode)
            maps = [None] * len(index)
            if self.captioner.has_attention:  # one teacher-forced pass over every caption of the group
                rows = iter(self.captioner.attention(features[[i for i, caps in zip(index, captions) for _ in caps]],
                                                     [c for caps in captions for c, _ in caps]))
                maps = [[next(rows) for _ in caps] for caps in captions]
            for i, caps, m in zip(index, captions, maps):
                results[i] = caps, m
        return results


def create_app(captioner: Captioner, cfg) -> FastAPI:
    """The web app around an already loaded captioner; `cfg` holds the keys of conf/serve.yaml."""
    server_wide = {k: v for k, v in decode_options(cfg).items() if k not in ("beam_size", "n_best")}
    batcher = Batcher(captioner, cfg.batch_window_ms, cfg.max_batch, server_wide, cfg.max_queue)
    max_bytes = int(cfg.max_upload_mb * 2**20)
    page = PAGE.read_text()
    decoding = None  # an asyncio.Semaphore(max_decoding), made inside the event loop
    limits = {"max_upload_bytes": max_bytes, "max_pixels": int(cfg.max_pixels), "max_side": cfg.max_side}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal decoding
        decoding = asyncio.Semaphore(cfg.max_decoding)
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="captioner", summary="Show and Tell image captioning", lifespan=lifespan)
    app.state.captioner, app.state.batcher = captioner, batcher
    app.add_middleware(BodyLimit, max_bytes=max_bytes + MULTIPART_SLACK)
    # outermost, so a request is counted (or refused) before any of its body is read
    app.add_middleware(Admission, limit=cfg.max_queue + cfg.max_decoding, timeout_s=cfg.upload_timeout_s)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # still JSON, and the server goes on
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return page

    @app.get("/health")
    def health():
        """Whether the model is ready; its checkpoint's file name (not where it is); forward passes; the limits."""
        body = {"ready": batcher.running, "checkpoint": captioner.ckpt_path.name, "device": str(captioner.device),
                "batches": batcher.batches, "images": batcher.images, "limits": limits}
        return JSONResponse(body, 200 if batcher.running else 503)

    limit = Annotated[int, Form(ge=1, le=cfg.max_beam_size)]

    @app.post("/api/caption")
    async def caption(file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
                      beam_size: limit = cfg.beam_size, n_best: limit = cfg.n_best):
        """Caption one image: its `n_best` most likely captions, probabilities normalised over them."""
        if n_best > beam_size:
            raise HTTPException(422, f"n_best={n_best} must not exceed beam_size={beam_size}")
        if n_best > 1 and cfg.temperature is not None:
            raise HTTPException(422, f"n_best={n_best} needs beam search; this server samples one caption "
                                     f"(temperature={cfg.temperature})")
        if not batcher.running:
            raise HTTPException(503, "the model is not ready")
        async with decoding:  # decoding is CPU work and memory: off the loop, a few at a time
            # read only now: until then the upload waits in its temporary file (on disk past 1 MiB), not in memory
            data = await file.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPException(413, f"upload too large: the limit is {max_bytes} bytes")
            image = await run_in_threadpool(decode_image, data, cfg.max_pixels, cfg.max_side,
                                            captioner.preprocess["image_size"])
            del data
        try:
            captions, maps = await batcher.caption(image, beam_size, n_best)
        except HTTPException:  # the queue is full: 503 with Retry-After
            raise
        except Exception as e:  # logged here; the client gets a JSON 500 and the server goes on
            log.exception("captioning failed")
            raise HTTPException(500, f"captioning failed: {type(e).__name__}") from None
        answer = [{"caption": c, "probability": p} for c, p in captions]
        for a, rows in zip(answer, maps or []):
            a["attention"] = attention_json(a["caption"], rows)
        return {"captions": answer, "model": captioner.info}

    return app


def attention_json(caption: str, rows) -> dict:
    """A caption's attention rows [words + 1, N] for the page: at most (max_len + 1) x N numbers (21 x 49 for a
    7 x 7 grid, about 6 KB of JSON)."""
    return {"words": caption.split() + [END_WORD], "grid": list(grid_shape(rows.shape[1])),
            "maps": rows.astype(float).round(3).tolist()}  # float64: 0.001, not 0.0010000000474974513


def uvicorn_config(app, cfg, **settings):
    """The uvicorn settings the server runs with; `settings` add to them (tests: log_level)."""
    import uvicorn

    return uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=cfg.access_log,
                          timeout_keep_alive=cfg.keep_alive_s, http=HeaderTimeout, **settings)


@one_line_errors
def main(argv=None):
    import uvicorn

    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, "serve"):
        return
    cfg = compose_config("serve", argv)
    checks.check_serve(cfg)
    captioner = Captioner(cfg.ckpt_path, cfg.device)
    logging.getLogger(__name__).info("Serving %s on http://%s:%d", captioner.ckpt_path, cfg.host, cfg.port)
    uvicorn.Server(uvicorn_config(create_app(captioner, cfg), cfg)).run()


if __name__ == "__main__":
    main()
