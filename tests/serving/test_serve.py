"""The web service: API answers and errors, batching, the CLI, and the page in a real headless browser."""
import io
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="serving needs fastapi (pip install fastapi uvicorn python-multipart)")
from fastapi.testclient import TestClient  # noqa: E402

from captioner.cli import compose_config  # noqa: E402
from captioner.serving.inference import Captioner  # noqa: E402
from captioner.serve import create_app, main  # noqa: E402

CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def captioner(trained):
    return Captioner(trained["ckpt"], "cpu")


@pytest.fixture(scope="module")
def images(trained):
    return sorted(Path(trained["cfg"].data.root, "val2017").glob("*.png"))


@pytest.fixture
def serve(captioner):
    """serve(*overrides) -> a TestClient (no socket) on a fresh app; its lifespan (the batching worker) runs."""
    clients = []

    def factory(*overrides):
        client = TestClient(create_app(captioner, compose_config("serve", list(overrides))))
        clients.append(client.__enter__())
        return client
    yield factory
    for client in clients:
        client.__exit__(None, None, None)


def post(client, data: bytes, **fields):
    return client.post("/api/caption", files={"file": ("image.png", data, "image/png")}, data=fields)


def png_bomb(width, height) -> bytes:
    """A small PNG claiming width x height pixels: what a decompression bomb looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


def test_caption_returns_ranked_captions_and_the_model(serve, captioner, images):
    response = post(serve(), images[0].read_bytes(), beam_size=3, n_best=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == captioner.info and body["model"]["checkpoint"] == captioner.ckpt_path.name
    probabilities = [c["probability"] for c in body["captions"]]
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert probabilities == sorted(probabilities, reverse=True)
    expected = captioner.caption([Image.open(images[0])], beam_size=3, n_best=3)[0]
    assert [c["caption"] for c in body["captions"]] == [c for c, _ in expected]
    assert all(c["caption"] for c in body["captions"])


def test_decode_defaults_come_from_the_config(serve, captioner, images):
    assert len(post(serve(), images[0].read_bytes()).json()["captions"]) == 1
    assert len(post(serve("beam_size=4", "n_best=2"), images[0].read_bytes()).json()["captions"]) == 2
    # the server-wide options: max_len, length_penalty, and sampling (decode=sample), which needs n_best=1
    image = Image.open(images[0])
    short = post(serve("max_len=2", "length_penalty=1.0"), images[0].read_bytes()).json()["captions"][0]["caption"]
    assert short == captioner.caption([image], beam_size=3, max_len=2, length_penalty=1.0)[0][0][0]
    assert len(short.split()) <= 2
    sampling = serve("decode=sample", "temperature=5.0", "top_k=50")
    sampled = {post(sampling, images[0].read_bytes()).json()["captions"][0]["caption"] for _ in range(4)}
    assert len(sampled) > 1, "hot sampling gives different captions, beam search one"
    response = post(sampling, images[0].read_bytes(), n_best="2", beam_size="3")
    assert response.status_code == 422 and "n_best=2 needs beam search" in response.json()["detail"]


def test_health_page_and_docs(serve, captioner):
    client = serve()
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["ready"] is True and health.json()["checkpoint"] == captioner.ckpt_path.name
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'src="http' not in page.text and 'href="http' not in page.text
    assert "/api/caption" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_health_says_not_ready_before_the_worker_runs(captioner):
    app = create_app(captioner, compose_config("serve", []))
    response = TestClient(app).get("/health")  # no `with`: the lifespan (the worker) never started
    assert response.status_code == 503 and response.json()["ready"] is False


def test_uploads_over_the_limit_get_413(serve, images):
    client = serve("max_upload_mb=0.01")  # 10485 bytes
    big = images[0].read_bytes() + b"\0" * 20_000  # within the multipart slack: caught when the file is read
    response = post(client, big)
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]
    response = post(client, b"\0" * 200_000)  # caught from Content-Length, before the body is read
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]

    def chunked():  # no Content-Length: caught while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(20):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"
    response = client.post("/api/caption", content=chunked(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "upload too large" in response.json()["detail"]


def test_files_that_are_not_images_are_refused_with_a_reason(serve, images):
    client = serve()
    response = post(client, b"just some text, not a picture")
    assert response.status_code == 415 and "not an image" in response.json()["detail"]
    truncated = images[0].read_bytes()[:200]
    response = post(client, truncated)
    assert response.status_code == 400 and "could not be decoded" in response.json()["detail"]
    # a format PIL knows but the server does not take: EPS would hand the upload to Ghostscript
    response = post(client, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert response.status_code == 415 and "not an image" in response.json()["detail"]


def test_a_16_bit_upload_is_reduced_in_32_bits_and_keeps_its_brightness():
    """A 6000 x 6000 16-bit PNG (84 KB): PIL's convert would clip it white; reduce refuses 16-bit modes."""
    import numpy as np

    from captioner.serving.uploads import decode_image

    pixels = np.zeros((6000, 6000), np.uint16)
    pixels[:, :3000] = 60_000
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    image = np.asarray(decode_image(buf.getvalue(), 40e6, 20_000, 224))
    assert image.shape == (462, 462, 3)  # box-reduced by 6000 // 448 = 13
    assert (image[:, 0] == 233).all() and (image[:, -1] == 0).all()  # 60000 / 257, not 255


def test_huge_pixel_counts_are_refused_before_decoding(serve, images):
    client = serve()  # max_pixels=40e6
    response = post(client, png_bomb(7_000, 7_000))  # over max_pixels, under PIL's own limit
    assert response.status_code == 413 and "7000x7000 pixels" in response.json()["detail"]
    response = post(client, png_bomb(100_000, 100_000))  # so large that PIL refuses it already
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    response = post(serve("max_pixels=1000"), images[0].read_bytes())
    assert response.status_code == 413 and "the limit is 1000 pixels" in response.json()["detail"]


def test_wrong_methods_paths_and_options(serve, images):
    client = serve()
    data = images[0].read_bytes()
    assert client.get("/api/caption").status_code == 405
    assert client.post("/api/other").status_code == 404
    assert client.post("/api/caption", data={"beam_size": "3"}).status_code == 422  # no file
    for fields in [{"beam_size": 0}, {"beam_size": 11}, {"beam_size": "wide"}, {"beam_size": 2, "n_best": 3}]:
        response = post(client, data, **fields)
        assert response.status_code == 422, fields
        assert response.json()["detail"]


def test_no_request_chooses_a_path_or_checkpoint(serve, captioner, images):
    response = serve().post("/api/caption?ckpt_path=/etc/passwd&path=/etc/passwd",
                            files={"file": ("../../etc/passwd", images[0].read_bytes())},
                            data={"ckpt_path": "/etc/passwd", "path": "/etc/passwd"})
    assert response.status_code == 200
    assert response.json()["model"]["checkpoint"] == captioner.ckpt_path.name


def caption_concurrently(client, requests):
    """Send (data, fields) requests at the same time from threads; TestClient serves them on one event loop."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: post(client, r[0], **r[1]), requests))


def test_concurrent_requests_share_forward_passes(serve, captioner, images):
    client = serve("batch_window_ms=500")
    options = [dict(beam_size=1, n_best=1), dict(beam_size=3, n_best=2), dict(beam_size=4, n_best=4)]
    requests = [(images[i].read_bytes(), options[i % 3]) for i in range(9)]
    responses = caption_concurrently(client, requests)
    assert [r.status_code for r in responses] == [200] * 9
    batcher = client.app.state.batcher
    assert batcher.images == 9 and batcher.batches < 9 / 2, f"{batcher.batches} forward passes for 9 requests"
    assert client.get("/health").json()["batches"] == batcher.batches
    for (data, fields), response in zip(requests, responses):  # batching does not change the answers
        alone = captioner.caption([Image.open(io.BytesIO(data))], max_len=20, **fields)[0]
        got = response.json()["captions"]
        assert [c["caption"] for c in got] == [c for c, _ in alone]
        assert [c["probability"] for c in got] == pytest.approx([p for _, p in alone], abs=1e-3)


def test_a_failing_request_fails_alone_and_the_server_goes_on(serve, captioner, images, monkeypatch):
    features = captioner.features

    def fragile(batch):  # inference that breaks on one particular image size
        if any(im.size == (13, 13) for im in batch):
            raise RuntimeError("boom")
        return features(batch)
    monkeypatch.setattr(captioner, "features", fragile)
    client = serve("batch_window_ms=500")
    bad = io.BytesIO()
    Image.new("RGB", (13, 13)).save(bad, "PNG")
    requests = [(images[0].read_bytes(), {}), (bad.getvalue(), {}), (images[1].read_bytes(), {})]
    responses = caption_concurrently(client, requests)
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert "captioning failed: RuntimeError" in responses[1].json()["detail"]
    assert post(client, images[2].read_bytes()).status_code == 200
    assert client.get("/health").json()["ready"] is True


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt_path={tmp_path}/missing.ckpt"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "missing.ckpt" in message and "\n" not in message


@pytest.fixture
def live_server(captioner):
    """The real app under uvicorn on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(captioner, compose_config("serve", [])), host="127.0.0.1",
                                           port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


def test_page_captions_an_image_in_a_real_browser(live_server, images, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install "
                                                                 "playwright; no `playwright install` needed)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium, or set CAPTIONER_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            requested = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(live_server)
            page.set_input_files("#file", str(images[0]))
            page.wait_for_selector("#captions li .caption", timeout=30_000)
            captions = page.locator("#captions li .caption").all_text_contents()
            assert captions and all(c.strip() for c in captions)
            assert len(captions) == 3  # the page asks for 3 captions by default
            assert page.locator("#captions li .prob").first.text_content().endswith("%")
            assert page.locator("#preview").is_visible()
            assert "efficientnet" in page.locator("#model").text_content()

            not_image = tmp_path / "notes.png"
            not_image.write_text("not a picture")
            page.set_input_files("#file", str(not_image))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "415" in page.locator("#status").text_content()

            posts = len([url for url in requested if url.endswith("api/caption")])
            page.set_input_files("#file", files=[{"name": "phone.jpg", "mimeType": "image/jpeg",
                                                  "buffer": b"\xff\xd8" + b"\0" * (12 * 2**20)}])
            page.wait_for_selector("#status.error:has-text('limit')", timeout=30_000)
            assert "the limit is 10.0 MB" in page.locator("#status").text_content()
            assert "up to 10.0 MB" in page.locator("#drop").text_content()
            assert len([url for url in requested if url.endswith("api/caption")]) == posts  # never uploaded
            assert all(url.startswith(live_server) or url.startswith("blob:") for url in requested), requested
        finally:
            browser.close()


def test_a_12_mb_upload_gets_the_413_json_in_urllib_and_httpx(live_server):
    """The body is drained before the answer, so clients that send it all first still read the 413."""
    import json
    import urllib.error
    import urllib.request

    import httpx

    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n" + \
        b"\0" * (12 * 2**20) + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    request = urllib.request.Request(live_server + "api/caption", data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 413 and "upload too large" in json.loads(e.value.read())["detail"]
    response = httpx.post(live_server + "api/caption", content=body, headers=headers, timeout=60)
    assert response.status_code == 413 and "the limit is 10485760 bytes" in response.json()["detail"]


def tall_png(width, height) -> bytes:
    """A real, fully decodable grey PNG of width x height (a few hundred KB for 1 x 39,000,000)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row, rows = zlib.compressobj(9), b"\0" + b"\x80" * width, []
    for _ in range(0, height, 100_000):
        rows.append(packer.compress(row * min(100_000, height - len(rows) * 100_000)))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(rows) + packer.flush())
            + chunk(b"IEND", b""))


def test_a_1_by_39_million_png_is_refused_quickly_without_memory(serve):
    import resource

    client = serve()
    data = tall_png(1, 39_000_000)  # under max_pixels (40e6), but decoding and resizing it took 58 s and 16.7 GB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    response = post(client, data)
    elapsed = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == 413, response.text
    assert "1x39000000 pixels, the limit is 20000 pixels on the longer side" in response.json()["detail"]
    assert elapsed < 5 and grown_mb < 50, (elapsed, grown_mb)


def test_pil_bombs_quote_the_configured_limit(serve):
    response = post(serve(), png_bomb(100_000, 100_000))  # so large that PIL refuses it itself
    assert response.status_code == 413
    assert "10000000000 pixels, the limit is 40000000 pixels" in response.json()["detail"]


def test_big_jpegs_are_decoded_reduced(captioner):
    from captioner.serving.uploads import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buffer, "JPEG")
    size = captioner.preprocess["image_size"]
    image = decode_image(buffer.getvalue(), 40e6, 20000, size)
    assert image.mode == "RGB" and 2 * size <= min(image.size) and max(image.size) < 4 * size + 8, image.size


def test_a_full_queue_answers_503_with_retry_after(serve, images):
    client = serve("max_queue=1", "max_batch=1", "batch_window_ms=1500")
    responses = caption_concurrently(client, [(images[i].read_bytes(), {}) for i in range(6)])
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert client.get("/health").json()["ready"] is True


def test_no_answer_tells_where_the_server_keeps_its_files(serve, captioner, images):
    client = serve()
    folder = str(captioner.ckpt_path.parent)
    assert folder not in client.get("/health").text and folder not in post(client, images[0].read_bytes()).text
    assert client.get("/health").json()["limits"]["max_upload_bytes"] == 10 * 2**20
