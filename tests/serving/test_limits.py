"""The server's memory and time bounds against hostile clients, on a real uvicorn on 127.0.0.1."""
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serving needs fastapi (pip install fastapi uvicorn python-multipart)")
import httpx  # noqa: E402

from captioner.cli import compose_config  # noqa: E402
from captioner.serve import create_app, uvicorn_config  # noqa: E402
from captioner.serving.inference import Captioner  # noqa: E402


@pytest.fixture(scope="module")
def captioner(trained):
    return Captioner(trained["ckpt"], "cpu")


@pytest.fixture(scope="module")
def image(trained):
    return sorted(Path(trained["cfg"].data.root, "val2017").glob("*.png"))[0].read_bytes()


@pytest.fixture
def live(captioner):
    """live(*overrides) -> (host, port) of the real app under uvicorn in a thread."""
    import uvicorn

    servers = []

    def start(*overrides):
        cfg = compose_config("serve", ["port=0", "access_log=false", *overrides])
        server = uvicorn.Server(uvicorn_config(create_app(captioner, cfg), cfg, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return server.servers[0].sockets[0].getsockname()[:2]
    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def open_upload(address, length=10**6, expect=False, body=b"") -> socket.socket:
    """A raw connection that sends a POST's headers (and `body`, the start of `length` bytes) and stops there."""
    sock = socket.create_connection(address, timeout=20)
    head = (f"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {length}\r\n" + ("Expect: 100-continue\r\n" if expect else "") + "\r\n")
    sock.sendall(head.encode() + body)
    return sock


def answer(sock) -> bytes:
    """The first response's status line and headers."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def url(address):
    return f"http://{address[0]}:{address[1]}/api/caption"


def test_uploads_past_the_limit_get_503_before_their_body_is_read(live, image):
    address = live("max_queue=1", "max_decoding=1")  # 2 uploads in flight at most
    holding = [open_upload(address, body=b"--b\r\n") for _ in range(2)]  # admitted, their bodies never finish
    time.sleep(0.5)
    # a client that waits for 100 Continue is answered from its headers alone: no body is asked for
    waiting = open_upload(address, expect=True)
    head = answer(waiting)
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
    with ThreadPoolExecutor(4) as pool:  # clients that send the whole body still read the 503 (it is drained)
        responses = list(pool.map(lambda _: httpx.post(url(address), files={"file": ("a.png", image)},
                                                       timeout=20), range(4)))
    assert [r.status_code for r in responses] == [503] * 4
    assert responses[0].headers["retry-after"] == "1" and "busy" in responses[0].json()["detail"]
    assert httpx.get(url(address).replace("api/caption", "health")).status_code == 200  # GETs are not counted
    for sock in holding + [waiting]:
        sock.close()
    time.sleep(0.5)  # the slots are given back when those clients go away
    assert httpx.post(url(address), files={"file": ("a.png", image)}, timeout=20).status_code == 200


def test_a_body_that_arrives_too_slowly_gets_408(live):
    address = live("upload_timeout_s=1")
    sock = open_upload(address, body=b"--b\r\n")
    head = answer(sock)
    assert head.startswith(b"HTTP/1.1 408"), head
    sock.close()


def closed_by_server(sock) -> bool:
    try:
        return sock.recv(100) == b""  # without the timeout: socket.timeout after 20 s
    except ConnectionResetError:
        return True


def test_idle_connections_and_slow_headers_are_closed(live):
    address = live("keep_alive_s=1")
    idle = socket.create_connection(address, timeout=20)
    slow = socket.create_connection(address, timeout=20)
    slow.sendall(b"POST /api/caption HTTP/1.1\r\n")
    try:
        for _ in range(4):  # a byte now and then: uvicorn's own timer restarted at each
            time.sleep(0.5)
            slow.sendall(b"X")
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed already
    assert closed_by_server(idle) and closed_by_server(slow)
    idle.close()
    slow.close()


def hostile_jpeg(side=2000, repeats=1500) -> bytes:
    """A small progressive JPEG whose last scan is repeated: each scan walks every block again (5 s to decode)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + data[-2:]  # -2: the end-of-image marker, kept once


def test_hostile_progressive_jpegs_are_refused_and_others_still_served(live, image):
    address, hostile = live(), hostile_jpeg()
    photo = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").resize((1200, 900)).save(photo, "JPEG", progressive=True)

    def send(data, delay=0.0):
        time.sleep(delay)
        return httpx.post(url(address), files={"file": ("a.jpg", data, "image/jpeg")}, timeout=60)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(send, hostile), pool.submit(send, hostile), pool.submit(send, photo.getvalue(), 0.3)]
        first, second, normal = [f.result() for f in futures]
    assert first.status_code == second.status_code == 422, first.text
    assert "1509 scans, the limit is 32" in first.json()["detail"]
    assert normal.status_code == 200 and normal.json()["captions"], normal.text  # a real progressive JPEG passes


MEASURE = """
import io, sys
from PIL import Image
from captioner.serving.uploads import decode_image

def read(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024

data = open(sys.argv[1], "rb").read()
tiny = io.BytesIO()
Image.new("RGBA", (8, 8)).save(tiny, "PNG")
decode_image(tiny.getvalue(), 40e6, 20000)  # loads PNG's plugin
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current size (Linux)
before = read("VmRSS")
decode_image(data, 40e6, 20000)
print(read("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_an_rgba_decode_takes_no_more_than_its_pixels(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (3000, 3000 // 50, 4), dtype=np.uint8)
    Image.fromarray(np.repeat(noise, 50, axis=1), "RGBA").save(tmp_path / "a.png", compress_level=1)
    # a fresh process: in this one, memory freed by earlier tests would be reused unseen
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "a.png")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    grown, pixels_mb = float(out.stdout), 3000 * 3000 * 4 / 2**20  # PIL keeps 4 bytes a pixel
    # the whole-image premultiplied copy inside Image.reduce doubled it
    assert grown < 1.15 * pixels_mb + (tmp_path / "a.png").stat().st_size / 2**20, (grown, pixels_mb)
