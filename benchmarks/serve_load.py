"""Load test of `digitlab serve`: latency percentiles and throughput under concurrent clients.

Starts the server itself (a subprocess on 127.0.0.1, a free port), sends a fixed number of
JSON-pixel and PNG-upload requests from N concurrent asyncio+httpx clients, prints a table.

    .venv/bin/python benchmarks/serve_load.py                       # trains a tiny run first
    .venv/bin/python benchmarks/serve_load.py --run runs/quick --backend onnx --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def train_tiny(out: Path) -> Path:
    """A `quick` run on 3,000 MNIST images, 2 epochs (~20 s): enough to serve."""
    from digitlab.data import load_mnist
    from digitlab.presets import get_preset
    from digitlab.train import fit

    train = load_mnist("train")
    data = (train.subset(np.arange(3000), "mnist:train[:3000]"),
            train.subset(np.arange(50000, 51000), "mnist:train[50000:51000]"))
    fit(get_preset("quick").with_overrides(epochs=2, batch_size=64, lr=3e-3), out, data=data)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to see cost apart from contention."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running_server(run: Path, backend: str, port: int):
    cmd = [sys.executable, "-m", "digitlab", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--backend", backend]
    # stderr to a file, not a pipe: a full pipe would stall the server
    with tempfile.TemporaryFile() as log, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log) as server:
        yield from _serve(server, log, port)


def _serve(server: subprocess.Popen, log, port: int):
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up within 120 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on Ctrl-C
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def canvas_pngs(images: np.ndarray) -> list[bytes]:
    """MNIST digits as the page sends them: 280x280 PNG, white ink on an opaque black canvas."""
    out = []
    for image in images:
        big = Image.fromarray(image).resize((280, 280), Image.Resampling.BILINEAR).convert("RGBA")
        buffer = io.BytesIO()
        big.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def raw_request(url: str, **kwargs) -> bytes:
    """One POST /v1/predict as the bytes on the wire (HTTP/1.1, keep-alive), built once by httpx."""
    request = httpx.Request("POST", url + "/v1/predict", **kwargs)
    body = request.read()
    head = ["POST /v1/predict HTTP/1.1", f"Host: {request.url.host}:{request.url.port}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in ("host", "connection")]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def raw_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> int:
    """Send one request and read its response on an open connection; returns the status code."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
    await reader.readexactly(length)
    return status


async def load(url: str, payloads: list[bytes], make_request, total: int, concurrency: int, timeout: float,
               client: str) -> dict[str, float]:
    """`total` requests from `concurrency` clients, each sending its next request when the last returns."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    host, port = url.removeprefix("http://").split(":")

    async def raw_client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        ok = await raw_exchange(reader, writer, payloads[i % len(payloads)]) == 200
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                latencies.append(time.perf_counter() - start)
                errors += not ok
        finally:
            writer.close()

    async def httpx_client(session: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                response = await session.post("/v1/predict", **make_request(i))
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    began = time.perf_counter()
    if client == "raw":
        await asyncio.gather(*(raw_client() for _ in range(concurrency)))
    else:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as session:
            await asyncio.gather(*(httpx_client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"requests": total, "errors": errors, "rps": total / elapsed, "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder to serve (default: train a tiny one)")
    parser.add_argument("--backend", choices=["torch", "onnx", "both"], default="both")
    parser.add_argument("--requests", type=int, default=3000, help="requests per scenario (default: 3000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    parser.add_argument("--scenarios", default="json,png", help="comma-separated: json (pixels), png (upload)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="raw: pre-built HTTP/1.1 requests on asyncio streams (~0.1 ms CPU per "
                        "request); httpx: httpx.AsyncClient (~2.5 ms CPU per request, which on 2 cores "
                        "takes CPU from the server being measured) (default: raw)")
    args = parser.parse_args()

    from digitlab.data import load_mnist

    test = load_mnist("test")
    pixels = [img.ravel().tolist() for img in test.images[:256]]
    pngs = canvas_pngs(test.images[:256])
    scenarios = {
        "json pixels": lambda i: {"json": {"pixels": pixels[i % len(pixels)]}},
        "png upload": lambda i: {"files": {"file": ("digit.png", pngs[i % len(pngs)], "image/png")}},
    }
    wanted = {"json": "json pixels", "png": "png upload"}
    scenarios = {wanted[k]: scenarios[wanted[k]] for k in args.scenarios.split(",")}
    backends = ["torch", "onnx"] if args.backend == "both" else [args.backend]

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_tiny(Path(tmp) / "tiny")
        rows = []
        for backend in backends:
            with running_server(run, backend, free_port()) as (url, pid):
                for name, make in scenarios.items():
                    payloads = [raw_request(url, **make(i)) for i in range(256)]
                    # warm-up: connections, oneDNN primitives, allocator
                    asyncio.run(load(url, payloads, make, 200, args.concurrency, args.timeout, args.client))
                    server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
                    result = asyncio.run(load(url, payloads, make, args.requests, args.concurrency, args.timeout,
                                              args.client))
                    result["server_cpu"] = (cpu_seconds(pid) - server_cpu) / args.requests * 1000
                    result["client_cpu"] = (time.process_time() - client_cpu) / args.requests * 1000
                    rows.append((backend, name, result))

    print(f"\n{args.concurrency} concurrent clients ({args.client}), {args.requests} requests per row, "
          f"loopback, {os.cpu_count()} CPUs (client and server share them)\n")
    print("| backend | request     | requests | errors | req/s  | p50 ms | p95 ms | p99 ms | max ms "
          "| server CPU ms/req | client CPU ms/req |")
    print("|---------|-------------|---------:|-------:|-------:|-------:|-------:|-------:|-------:"
          "|------------------:|------------------:|")
    for backend, name, r in rows:
        print(f"| {backend:<7} | {name:<11} | {r['requests']:8d} | {r['errors']:6d} | {r['rps']:6.0f} | "
              f"{r['p50']:6.2f} | {r['p95']:6.2f} | {r['p99']:6.2f} | {r['max']:6.1f} "
              f"| {r['server_cpu']:17.2f} | {r['client_cpu']:17.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
