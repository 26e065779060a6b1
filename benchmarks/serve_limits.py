"""The server's memory and time bounds under hostile load: the real server (uvicorn on 127.0.0.1) in a subprocess.

    python benchmarks/serve_limits.py                     # ckpt `last` (trains a smoke model if none), defaults
    python benchmarks/serve_limits.py --uploads 250 --upload-mib 9
    python benchmarks/serve_limits.py --uploads 24 --rgba-side 6000   # many pixels: the decode's share

1. `--uploads` concurrent PNG uploads of about `--upload-mib` MiB each (or of `--rgba-side` RGBA PNGs): the
   server's peak memory (VmHWM from /proc/<pid>/status) before and after, and how many got 200 and 503 (with
   Retry-After).
2. Two hostile progressive JPEGs (6000 x 6000, last scan repeated 1,500 times, ~400 KB) and, 1.5 s later, a normal
   image: each one's status and seconds.
Last line: one JSON object with those figures.
"""
import argparse
import asyncio
import io
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serve_load import HOST, checkpoint, free_port, start_server  # benchmarks/serve_load.py, beside this file


def memory_mb(pid, key):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024


def noise_png(mib) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is its pixels' (about `mib` MiB)."""
    side = int((mib * 2**20 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def rgba_png(side) -> bytes:
    """A side x side RGBA PNG of noise stretched 50 times across (a few MB): many pixels for few bytes."""
    noise = np.random.default_rng(0).integers(0, 255, (side, side // 50, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(noise, 50, axis=1), "RGBA").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def hostile_jpeg(side=6000, repeats=1500) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + data[-2:]


async def post(http, url, data, name, delay=0.0):
    await asyncio.sleep(delay)
    start = time.perf_counter()
    try:
        r = await http.post(url, files={"file": (name, data)})
        return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start
    except httpx.HTTPError as e:  # no answer at all: counted, never hidden
        return type(e).__name__, None, time.perf_counter() - start


async def flood(url, data, n):
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        return await asyncio.gather(*(post(http, url, data, "big.png") for _ in range(n)))


async def hostile(url, normal):
    async with httpx.AsyncClient(timeout=300) as http:
        bad = hostile_jpeg()
        return await asyncio.gather(post(http, url, bad, "a.jpg"), post(http, url, bad, "b.jpg"),
                                    post(http, url, normal, "normal.png", delay=1.5))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="last", help="checkpoint file, or `last` (trains a smoke model if none)")
    parser.add_argument("--uploads", type=int, default=250)
    parser.add_argument("--upload-mib", type=float, default=9)
    parser.add_argument("--rgba-side", type=int, help="upload side x side RGBA PNGs instead (e.g. 6000: 36 MP)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(args.ckpt, Path(tmp))
        normal = noise_png(0.5)
        port = free_port()
        server = start_server(ckpt, port, "device=cpu")
        url = f"http://{HOST}:{port}/api/caption"
        try:
            for _ in range(3):  # warm-up, not measured
                httpx.post(url, files={"file": ("w.png", normal)}, timeout=120).raise_for_status()
            idle = memory_mb(server.pid, "VmHWM")
            start = time.perf_counter()
            answers = asyncio.run(flood(url, rgba_png(args.rgba_side) if args.rgba_side
                                       else noise_png(args.upload_mib), args.uploads))
            flood_s = time.perf_counter() - start
            peak = memory_mb(server.pid, "VmHWM")
            (bad1, _, t1), (bad2, _, t2), (ok, _, t_ok) = asyncio.run(hostile(url, normal))
        finally:
            server.terminate()
            server.wait(30)

    statuses = [status for status, _, _ in answers]
    result = {
        "uploads": args.uploads, "upload_mib": args.upload_mib, "rgba_side": args.rgba_side,
        "vmhwm_idle_mb": round(idle),
        "vmhwm_peak_mb": round(peak), "ok_200": statuses.count(200), "busy_503": statuses.count(503),
        "busy_with_retry_after": sum(s == 503 and ra == "1" for s, ra, _ in answers),
        "other": sorted({str(s) for s in statuses} - {"200", "503"}), "flood_s": round(flood_s, 1),
        "hostile_status": [bad1, bad2], "hostile_s": [round(t1, 2), round(t2, 2)],
        "normal_status": ok, "normal_s": round(t_ok, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
