"""`digitlab serve` against hostile and broken clients (issue 12, items 1-6).

Real servers listen on a free port on 127.0.0.1 only; socket counts and deadlines are in the tests.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from digitlab.errors import DigitlabError
from digitlab.serve import Limits, create_app
from net_helpers import free_port

httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

PIXELS = 28 * 28
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def predictor(tiny_run: Path):
    from digitlab.inference import load_predictor

    return load_predictor(tiny_run, precision="fp32")


@pytest.fixture(scope="module")
def app(predictor):
    return create_app(predictor)


def _digit(side: int, mode: str) -> Image.Image:
    """A '1' stroke on a transparent (RGBA) or white (RGB) square canvas."""
    image = Image.new(mode, (side, side), (0, 0, 0, 0) if mode == "RGBA" else (255, 255, 255))
    ImageDraw.Draw(image).line([(side // 2, side // 5), (side // 2, side * 4 // 5)],
                               fill=(0, 0, 0, 255) if mode == "RGBA" else (0, 0, 0), width=max(1, side // 20))
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- 6: the port


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1", "http"])
def test_serve_refuses_ports_outside_the_tcp_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    from digitlab.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "runs/x", "--port", port])
    assert exit_info.value.code == 2
    assert "1..65535" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "runs/x", "--port", "65535"]).port == 65535


def test_serve_on_a_port_in_use_says_so_before_loading_the_model(tiny_run: Path, monkeypatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from digitlab.cli import main
    from digitlab.serve import app as serve_app

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a server that cannot listen")

    monkeypatch.setattr(serve_app, "create_app", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_run), "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: another program" in err and "--port" in err
    serve_app.check_can_listen("127.0.0.1", free_port())  # a free port passes
    serve_app.check_can_listen("", free_port())  # "": every interface, as uvicorn reads it
    with pytest.raises(DigitlabError, match="not an address of this machine"):
        serve_app.check_can_listen("192.0.2.1", free_port())  # TEST-NET-1: no machine's own address


def test_the_port_check_binds_every_address_the_host_names(monkeypatch) -> None:
    """A name that resolves to several addresses (localhost: ::1 and 127.0.0.1) is served on all of
    them: one busy is a refusal; one the machine lacks is skipped, as asyncio skips it."""
    from digitlab.serve import app as serve_app

    def resolves_to(*addresses: str):
        def getaddrinfo(host, port, **kwargs):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]
        return getaddrinfo

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(socket, "getaddrinfo", resolves_to("192.0.2.1", "127.0.0.1"))
        with pytest.raises(DigitlabError, match=f"cannot listen on both:{port}: another program"):
            serve_app.check_can_listen("both", port)
    free = free_port()
    serve_app.check_can_listen("both", free)  # 192.0.2.1 skipped, 127.0.0.1 free
    monkeypatch.setattr(socket, "getaddrinfo", resolves_to("192.0.2.1"))
    with pytest.raises(DigitlabError, match=r"cannot listen on \[::5\]:\d+: not an address of this machine"):
        serve_app.check_can_listen("::5", free)


# ---------------------------------------------------------------- 3: huge integers, aborted bodies


def test_a_5000_digit_integer_is_a_clean_422(app) -> None:
    client = TestClient(app, raise_server_exceptions=False)
    body = '{"pixels": [' + "7" * 5000 + "]}"
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "number" in response.json()["detail"]


def test_a_client_that_aborts_mid_body_costs_one_log_line_and_no_traceback(
        app, caplog: pytest.LogCaptureFixture) -> None:
    messages = [{"type": "http.request", "body": b'{"pixels": [0, 0, ', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", b"4000")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):  # uvicorn logs a traceback for anything that escapes the app
            messages[:] = [{"type": "http.request", "body": b'{"pixels": [0, 0, ', "more_body": True},
                           {"type": "http.disconnect"}]
            asyncio.run(app(scope, receive, send))
    mine = [r for r in caplog.records if r.name.startswith(("digitlab", "uvicorn", "fastapi", "starlette"))]
    assert not [r for r in mine if r.exc_info], "an aborted upload must not log a traceback"
    assert len(mine) <= 3  # at most one line per abort


# ---------------------------------------------------------------- 2: decoded size and memory


def test_a_small_file_with_too_many_pixels_is_refused_before_decoding(app) -> None:
    client = TestClient(app)
    data = _encode(_digit(4096, "RGBA"), "PNG")  # ~70 KB that decode to 64 MB (and ~300 MB in work)
    assert len(data) < 200_000
    response = client.post("/v1/predict", files={"file": ("big.png", data, "image/png")})
    assert response.status_code == 413
    assert "megapixels" in response.json()["detail"]
    ok = client.post("/v1/predict", files={"file": ("ok.png", _encode(_digit(2048, "RGBA"), "PNG"), "image/png")})
    assert ok.status_code == 200 and ok.json()["digit"] == 1


def test_a_large_jpeg_is_reduced_while_decoding(predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    import digitlab.data.preprocess

    real, seen = digitlab.data.preprocess.mnist_style, []

    def spy(image, **kwargs):
        seen.append(image.size)
        return real(image, **kwargs)

    monkeypatch.setattr(digitlab.data.preprocess, "mnist_style", spy)  # create_app imports it when called
    client = TestClient(create_app(predictor))
    data = _encode(_digit(4096, "RGB"), "JPEG")
    response = client.post("/v1/predict", files={"file": ("big.jpg", data, "image/jpeg")})
    assert response.status_code == 200 and response.json()["digit"] == 1
    assert seen == [(2048, 2048)]  # 1/2 scale: the least reduction within 4 megapixels


def test_uploads_decode_at_most_max_decoding_at_once(predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    import digitlab.data.preprocess

    real, active, peak = digitlab.data.preprocess.mnist_style, [0], [0]
    lock = threading.Lock()

    def slow(image, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(image, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(digitlab.data.preprocess, "mnist_style", slow)
    app = create_app(predictor, limits=Limits(max_decoding=2))
    data = _encode(_digit(600, "RGB"), "PNG")  # over 512x512: decoded in one of the slots

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.post("/v1/predict", files={"file": ("d.png", data, "image/png")})
                                               for _ in range(12)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 12
    assert peak[0] == 2


# ---------------------------------------------------------------- 4: the ONNX file is the run's


def test_export_records_the_weights_sha256(tiny_run: Path, tmp_path: Path) -> None:
    from digitlab.export import export_onnx, read_onnx_metadata

    path = export_onnx(tiny_run, tmp_path / "m.onnx")
    expected = json.loads((tiny_run / "model.json").read_text())["weights_sha256"]
    assert read_onnx_metadata(path)["weights_sha256"] == expected


def test_another_runs_onnx_file_is_never_served(tiny_run: Path, tmp_path: Path, predictor, mnist_test,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from digitlab.export import ONNX_FILE, load_onnx_predictor, module_to_onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = copy.deepcopy(predictor.models[0]).float().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator(device=p.device).manual_seed(0), device=p.device))
    (run / ONNX_FILE).write_bytes(module_to_onnx(other, {"weights_sha256": "f" * 64}))
    future = time.time() + 60
    os.utime(run / ONNX_FILE, (future, future))  # newer than the weights: only the checksum tells
    images = mnist_test.images[:64]
    with caplog.at_level(logging.WARNING, logger="digitlab.export"):
        served = load_onnx_predictor(run)
    assert np.abs(served.predict_proba(images) - predictor.predict_proba(images)).max() < 1e-4
    assert any("other weights" in r.getMessage() for r in caplog.records)
    app_info = TestClient(create_app(run)).get("/v1/model").json()
    assert app_info["fingerprint"] == json.loads((run / "model.json").read_text())["weights_sha256"][:16]


def test_the_runs_own_onnx_file_is_used(tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from digitlab.export import export_onnx, load_onnx_predictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export_onnx(run)
    with caplog.at_level(logging.INFO, logger="digitlab.export"):
        load_onnx_predictor(run)
    assert any(r.getMessage().startswith("using ") for r in caplog.records)


# ---------------------------------------------------------------- 5: /docs offline


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(app, page: str) -> None:
    client = TestClient(app)
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.findall(r"https?://|//cdn|src=\"//|href=\"//", html), "the page must not name another host"
    assets = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", html) + re.findall(r"url: ?['\"]([^'\"]+)['\"]", html)
    assert len([a for a in assets if a.endswith((".js", ".css"))]) >= 1
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


# ---------------------------------------------------------------- 1: idle and slow clients


def _serve_in_thread(app, guard) -> Iterator[int]:
    import uvicorn

    from digitlab.serve.guard import InFlightLimit, serve_options

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(InFlightLimit(app, 1024), log_level="warning", access_log=False,
                                           **serve_options(guard)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reads until EOF or reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_guard_deadlines_and_per_client_cap(app) -> None:
    from digitlab.serve.guard import ConnectionGuard

    guard = ConnectionGuard(head_timeout=0.5, body_timeout=1.0, per_client=4)
    for port in _serve_in_thread(app, guard):
        idle = socket.create_connection(("127.0.0.1", port))
        slow_head = socket.create_connection(("127.0.0.1", port))
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 5000\r\n\r\n{\"pixels\": [0,")
        start = time.monotonic()
        assert _closed_within(idle, 3) and _closed_within(slow_head, 3)
        assert time.monotonic() - start < 2
        assert _closed_within(slow_body, 3)  # 1 s body deadline
        for sock in (idle, slow_head, slow_body):
            sock.close()


def test_guard_cap_evicts_silent_connections_before_answered_ones(app) -> None:
    from digitlab.serve.guard import ConnectionGuard

    guard = ConnectionGuard(head_timeout=30, per_client=4)
    for port in _serve_in_thread(app, guard):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert client.get("/healthz").status_code == 200  # answered, then kept alive
            held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # 1 + 4 > 4
            assert _closed_within(held[0], 2)  # the oldest silent one made room
            assert not _closed_within(held[1], 0.2)
            assert client.get("/healthz").status_code == 200  # on the same kept-alive connection
            assert guard.evicted == 1
            newcomer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # evicts held[1]
            assert newcomer.status_code == 200
            assert _closed_within(held[1], 2)
        for sock in held:
            sock.close()


@pytest.fixture(scope="module")
def cli_server(tiny_run: Path) -> Iterator[tuple[str, int]]:
    """`digitlab serve` as users start it, in a subprocess on a free loopback port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "digitlab", "serve", str(tiny_run), "--host", "127.0.0.1", "--port", str(port)]
    log = open(Path(tiny_run).parent / f"serve-{port}.log", "w+b")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not come up within 120 s")
            time.sleep(0.2)
        yield base, server.pid
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.slow
def test_idle_and_trickling_sockets_do_not_lock_anyone_out(cli_server: tuple[str, int]) -> None:
    idle_count, trickle_count = 1000, 100  # uvicorn's old 503 threshold was 1,024 open sockets
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = idle_count + trickle_count + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    base, _ = cli_server
    port = int(base.rsplit(":", 1)[1])
    hostile: list[socket.socket] = []
    try:
        for _ in range(idle_count):
            hostile.append(socket.create_connection(("127.0.0.1", port)))
        for i in range(trickle_count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                         b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n[0,")
            hostile.append(sock)
        time.sleep(0.5)
        start = time.monotonic()
        with httpx.Client(base_url=base, timeout=5) as client:
            assert client.get("/healthz").status_code == 200
            assert client.post("/v1/predict", json={"pixels": [0] * PIXELS}).status_code == 200
        assert time.monotonic() - start < 5
        # Those that never sent a head are gone after the 5 s head deadline (polled up to 10 s).
        silent = hostile[:idle_count]
        for sock in silent:
            sock.setblocking(False)
        open_ = set(range(idle_count))
        deadline = time.monotonic() + 10
        while open_ and time.monotonic() < deadline:
            time.sleep(0.5)
            for i in list(open_):
                try:
                    if silent[i].recv(1) == b"":
                        open_.discard(i)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    open_.discard(i)
        assert not open_, f"{len(open_)} silent sockets still open"
    finally:
        for sock in hostile:
            sock.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_16_concurrent_worst_case_uploads_stay_within_memory_bounds(cli_server: tuple[str, int]) -> None:
    base, pid = cli_server
    uploads = [("big.jpg", _encode(_digit(4096, "RGB"), "JPEG"), "image/jpeg"),  # reduced while decoding
               ("max.png", _encode(_digit(2048, "RGBA"), "PNG"), "image/png")]  # the most pixels accepted
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(pid))
            time.sleep(0.005)

    async def burst(name: str, data: bytes, mime: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/predict", files={"file": (name, data, mime)})
                                               for _ in range(16)))
        return [r.status_code for r in responses]

    before = _rss_mb(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for upload in uploads:
            assert asyncio.run(burst(*upload)) == [200] * 16
    finally:
        stop.set()
        sampler.join()
    time.sleep(1.0)
    after = _rss_mb(pid)
    assert peak[0] - before < 500, f"peak RSS rose by {peak[0] - before:.0f} MB"
    assert after - before < 100, f"RSS stayed {after - before:.0f} MB above where it started"
