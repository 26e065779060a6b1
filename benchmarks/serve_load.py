"""Load test of `captioner.serve`: the real server (uvicorn on 127.0.0.1) under N concurrent clients.

    python benchmarks/serve_load.py                                # ckpt `last`; 16 clients, 320 requests
    python benchmarks/serve_load.py --ckpt outputs/.../last.ckpt --clients 32 --requests 1000
    python benchmarks/serve_load.py --max-batch 1                  # batching off, for comparison

Starts `python -m captioner.serve` in a subprocess on a free loopback port (with no checkpoint found, first trains
a seconds-long smoke model), captions shapes images, and prints requests/s, p50/p95 latency, mean batch size and
whether every request got an answer. Last line: one JSON object with those figures.
"""
import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from captioner.cli import compose_config
from captioner.checkpoint import resolve_checkpoint
from captioner.data.shapes import make_shapes
from captioner.utils import CaptionerError

HOST = "127.0.0.1"  # loopback only


def checkpoint(ckpt, tmp: Path) -> Path:
    try:
        return resolve_checkpoint(ckpt)
    except CaptionerError:
        if ckpt not in (None, "", "last"):
            raise
    from captioner.run import train

    print("No last.ckpt under outputs/: training a smoke model first.", file=sys.stderr)
    cfg = compose_config("config", ["experiment=smoke", f"paths.data_dir={tmp}/data", f"paths.run_dir={tmp}/run",
                                    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"])
    train(cfg)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(ckpt, port, *overrides) -> subprocess.Popen:
    """`python -m captioner.serve` on loopback with `overrides`, once its /health says it is ready."""
    command = [sys.executable, "-m", "captioner.serve", f"ckpt_path={ckpt}", f"host={HOST}", f"port={port}",
               "access_log=false", *overrides]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited ({server.returncode}): {server.stderr.read().strip()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).json().get("ready"):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.kill()
    sys.exit("the server did not become ready within 180 s")


async def load(url, images, clients, total, duration, beam_size, n_best):
    """`clients` loops that each send one request at a time until `total` are sent or `duration` s pass."""
    latencies, statuses, failures, sent = [], [], [], 0
    deadline = time.monotonic() + duration

    async def client(http):
        nonlocal sent
        while sent < total and time.monotonic() < deadline:
            data = images[sent % len(images)]
            sent += 1
            start = time.perf_counter()
            try:
                r = await http.post(url, files={"file": ("image.png", data, "image/png")},
                                    data={"beam_size": beam_size, "n_best": n_best})
                statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["captions"]:
                    latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:  # no answer at all: counted, never hidden
                failures.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, statuses, failures, sent, elapsed


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="last", help="checkpoint file, or `last` (trains a smoke model if none)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="total requests (at least 200 recommended)")
    parser.add_argument("--duration", type=float, default=300, help="stop sending after this many seconds")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--n-best", type=int, default=1)
    parser.add_argument("--window-ms", type=float, default=10)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = checkpoint(args.ckpt, tmp)
        images = [p.read_bytes() for p in sorted(make_shapes(tmp / "shapes", {"val2017": 32}).glob("val2017/*.png"))]
        port = free_port()
        server = start_server(ckpt, port, f"batch_window_ms={args.window_ms}", f"max_batch={args.max_batch}")
        try:
            base = f"http://{HOST}:{port}"
            for data in images[:4]:  # warm-up, not timed
                httpx.post(f"{base}/api/caption", files={"file": ("w.png", data)}, timeout=120).raise_for_status()
            before = httpx.get(f"{base}/health").json()
            latencies, statuses, failures, sent, elapsed = asyncio.run(
                load(f"{base}/api/caption", images, args.clients, args.requests, args.duration, args.beam_size,
                     args.n_best))
            after = httpx.get(f"{base}/health").json()
        finally:
            server.terminate()
            server.wait(30)

    batches = after["batches"] - before["batches"]
    result = {
        "checkpoint": str(ckpt), "clients": args.clients, "requests": sent, "ok": len(latencies),
        "all_answered": len(latencies) == sent and not failures,
        "errors": len(failures) + sum(s != 200 for s in statuses),
        "requests_per_s": round(sent / elapsed, 2), "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1), "seconds": round(elapsed, 2),
        "forward_passes": batches, "mean_batch": round((after["images"] - before["images"]) / max(batches, 1), 2),
        "window_ms": args.window_ms, "max_batch": args.max_batch, "beam_size": args.beam_size,
    }
    print(f"{sent} requests from {args.clients} clients in {elapsed:.1f} s: {result['requests_per_s']} requests/s")
    print(f"latency p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms; {batches} forward passes, "
          f"{result['mean_batch']} images each")
    print(f"every request answered: {result['all_answered']} ({result['ok']} ok, {result['errors']} errors)"
          + (f"; first failure: {failures[0]}" if failures else ""))
    print(json.dumps(result))
    if not result["all_answered"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
