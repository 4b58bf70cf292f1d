"""`digitlab serve` under hostile clients: idle/slow sockets, and worst-case image uploads.

Starts the server itself (a subprocess on 127.0.0.1, a free port), then
1. opens IDLE sockets that send nothing and TRICKLE sockets that send a request head (half of
   them) or a body (the other half) one byte every 0.5 s, reconnecting 1 s after the server closes
   one, and meanwhile times /healthz and /v1/predict from a well-behaved client;
2. sends 16 concurrent worst-case uploads per kind (a 4096x4096 RGBA PNG, a 2048x2048 RGBA PNG,
   a 4096x4096 JPEG) and samples the server's resident memory every 5 ms.
Prints two tables.

    .venv/bin/python benchmarks/serve_hostile.py                      # trains a tiny run first
    .venv/bin/python benchmarks/serve_hostile.py --run runs/quick --idle 1000 --trickle 100
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from serve_load import free_port, running_server, train_tiny

PIXELS = 28 * 28


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Peak resident memory of a process, sampled every `interval` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def drawn_digit(side: int, mode: str) -> Image.Image:
    """A '1' stroke on a transparent (RGBA) or white (RGB) canvas of side x side pixels."""
    image = Image.new(mode, (side, side), (0, 0, 0, 0) if mode == "RGBA" else (255, 255, 255))
    ImageDraw.Draw(image).line([(side // 2, side // 5), (side // 2, side * 4 // 5)],
                               fill=(0, 0, 0, 255) if mode == "RGBA" else (0, 0, 0), width=max(1, side // 20))
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"optimize": True} if fmt == "PNG" else {"quality": 90}))
    return buffer.getvalue()


# ---------------------------------------------------------------- slow clients


async def hold(port: int, payload: bytes, trickle: bytes, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Keep one hostile connection open: send `payload` at once, then `trickle` a byte per 0.5 s."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(1)
            continue
        counts["connections"] += 1
        try:
            if payload:
                writer.write(payload)
            for i in range(10**9):
                if stop.is_set():
                    break
                if trickle:
                    writer.write(trickle[i % len(trickle) : i % len(trickle) + 1])
                    await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                        counts["closed_by_server"] += 1
                        break
                except TimeoutError:
                    continue
        except OSError:
            counts["closed_by_server"] += 1
        finally:
            writer.close()
        if not stop.is_set():
            await asyncio.sleep(1)  # a persistent attacker: back a second later


async def slow_clients(base: str, port: int, idle: int, trickle: int, probes: int) -> dict[str, object]:
    stop = asyncio.Event()
    counts = {"connections": 0, "closed_by_server": 0, "connect_failed": 0}
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body_head = head + b"Content-Length: 100000\r\n\r\n"
    tasks = [asyncio.create_task(hold(port, b"", b"", stop, counts)) for _ in range(idle)]
    tasks += [asyncio.create_task(hold(port, b"", head, stop, counts)) for _ in range(trickle // 2)]
    tasks += [asyncio.create_task(hold(port, body_head, b"[0,0,0,", stop, counts))
              for _ in range(trickle - trickle // 2)]
    await asyncio.sleep(2.0)  # all of them connected and holding
    statuses: dict[str, list[int]] = {"/healthz": [], "/v1/predict": []}
    latencies: dict[str, list[float]] = {"/healthz": [], "/v1/predict": []}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(probes):
            for route in statuses:
                start = time.perf_counter()
                try:
                    if route == "/healthz":
                        response = await client.get(route)
                    else:
                        response = await client.post(route, json={"pixels": [0] * PIXELS})
                    statuses[route].append(response.status_code)
                except httpx.HTTPError as exc:
                    statuses[route].append(-1)
                    print(f"  {route}: {exc.__class__.__name__}")
                latencies[route].append(time.perf_counter() - start)
            await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"statuses": statuses, "latencies": latencies, **counts}


# ---------------------------------------------------------------- memory


async def upload_burst(base: str, data: bytes, mime: str, concurrent: int) -> list[int]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one() -> int:
            response = await client.post("/v1/predict", files={"file": ("digit", data, mime)})
            return response.status_code

        return list(await asyncio.gather(*(one() for _ in range(concurrent))))


def memory(base: str, pid: int, concurrent: int) -> list[tuple[str, int, list[int], float, float, float]]:
    kinds = [
        ("4096x4096 RGBA PNG", encoded(drawn_digit(4096, "RGBA"), "PNG"), "image/png"),
        ("2048x2048 RGBA PNG", encoded(drawn_digit(2048, "RGBA"), "PNG"), "image/png"),
        ("4096x4096 JPEG", encoded(drawn_digit(4096, "RGB"), "JPEG"), "image/jpeg"),
    ]
    rows = []
    for name, data, mime in kinds:
        time.sleep(1.0)
        before = rss_mb(pid)
        with RssSampler(pid) as sampler:
            statuses = asyncio.run(upload_burst(base, data, mime, concurrent))
            time.sleep(0.5)
        time.sleep(2.0)
        rows.append((name, len(data), statuses, before, sampler.peak, rss_mb(pid)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="run folder to serve (default: train a tiny one)")
    parser.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    parser.add_argument("--idle", type=int, default=1000, help="sockets that send nothing (default: 1000)")
    parser.add_argument("--trickle", type=int, default=100, help="sockets that trickle a head or body (default: 100)")
    parser.add_argument("--probes", type=int, default=10, help="well-behaved requests per route (default: 10)")
    parser.add_argument("--concurrent", type=int, default=16, help="uploads at once per kind (default: 16)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_tiny(Path(tmp) / "tiny")
        port = free_port()
        with running_server(run, args.backend, port) as (base, pid):
            slow = asyncio.run(slow_clients(base, port, args.idle, args.trickle, args.probes))
            mem = memory(base, pid, args.concurrent)

    print(f"\n{args.idle} idle + {args.trickle} trickling sockets (reconnecting 1 s after a close); "
          f"{slow['connections']} connections opened, {slow['closed_by_server']} closed by the server, "
          f"{slow['connect_failed']} connects failed")
    print("| route | requests | statuses | median s | max s |\n|---|---|---|---|---|")
    for route, statuses in slow["statuses"].items():  # type: ignore[union-attr]
        lat = slow["latencies"][route]  # type: ignore[index]
        counts = ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses)))
        print(f"| {route} | {len(statuses)} | {counts} | {np.median(lat):.3f} | {max(lat):.3f} |")
    print(f"\n{args.concurrent} concurrent uploads per kind; server RSS in MB")
    print("| upload | bytes | statuses | before | peak | +peak | after 2 s | after - before |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, size, statuses, before, peak, after in mem:
        counts = ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses)))
        print(f"| {name} | {size:,} | {counts} | {before:.0f} | {peak:.0f} | {peak - before:+.0f} | {after:.0f} "
              f"| {after - before:+.0f} |")


if __name__ == "__main__":
    main()
