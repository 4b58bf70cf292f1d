"""The HTTP API around one model loaded at start-up: predict, model info, health, drawing page.

Request bodies are size-capped before parsing; inference, decoding and large bodies are handled
off the event loop (one batching inference thread, anyio's worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import gc
import io
import json
import logging
import math
import os
import queue
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from digitlab.abstain import abstain_reasons, min_confidence
from digitlab.calibration import DEFAULT_MIN_CONFIDENCE
from digitlab.data.images import reduce_while_decoding, upright
from digitlab.errors import DigitlabError
from digitlab.pixels import PIXELS, as_uint8_images
from digitlab.serve.docs import add_offline_docs

if TYPE_CHECKING:  # torch loads with the model, not with the module
    from digitlab.inference import ProbabilityModel

log = logging.getLogger(__name__)

STATIC_DIR = Path(str(files("digitlab.serve") / "static"))

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow may decode; never EPS/PSD/...
MULTIPART_OVERHEAD = 16 * 1024  # boundaries and part headers around the file, bytes
INLINE_BYTES = 16 * 1024  # JSON this small is parsed/written on the event loop (a thread hop costs more)
# The page may load only what this server serves: no CDN, no fonts, no analytics.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What one request may carry; beyond these it gets a 413 before any decoding."""

    max_upload_bytes: int = 2 * 1024 * 1024  # one image file (multipart field or raw body)
    max_json_bytes: int = 8 * 1024 * 1024  # 256 images x 784 numbers written with decimals fit
    max_side: int = 4096  # pixels per image side, checked from the header before decoding
    # pixels decoded per image (2048x2048): an 87 KB 4096x4096 RGBA PNG decoded costs ~300 MB.
    # JPEGs are reduced to 1/2-1/8 per side while decoding to fit; other formats past it get a 413.
    max_pixels: int = 2048 * 2048
    max_decoding: int = 2  # images over 512x512 decoded at once; more wait their turn (memory)
    max_batch: int = 256  # images per JSON request


class ApiError(Exception):
    """A client mistake with its HTTP status; leaves as {"detail": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------- OpenAPI shapes (documentation only)


class PredictionOut(BaseModel):
    digit: int = Field(description="the most probable class")
    probability: float = Field(description="its probability")
    probabilities: list[float] = Field(description="all ten class probabilities, index = digit")
    uncertain: bool = Field(description="true: do not trust `digit` (not a digit, or the model is unsure)")
    reason: str | None = Field(description="why, when uncertain: too little ink, not digit-shaped, several "
                               "digits, low confidence")
    image: list[list[int]] = Field(description="the 28x28 uint8 image the model saw (white ink on black)")


class BatchPredictionOut(BaseModel):
    predictions: list[PredictionOut]


class ErrorOut(BaseModel):
    detail: str


_PIXELS_SCHEMA = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 255},
                  "minItems": PIXELS, "maxItems": PIXELS}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary",
                                                   "description": "PNG/JPEG of one digit, any size"}}},
            },
            "application/json": {
                "schema": {"oneOf": [
                    {"type": "object", "required": ["pixels"], "properties": {"pixels": _PIXELS_SCHEMA}},
                    {"type": "object", "required": ["images"],
                     "properties": {"images": {"type": "array", "items": _PIXELS_SCHEMA, "maxItems": 256}}},
                ]},
                "example": {"pixels": [0] * PIXELS},
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# ---------------------------------------------------------------- the CPU work


class BatchingPredictor:
    """One inference thread that runs whatever requests are waiting as one batch.

    While a forward pass runs, new requests queue up; the next pass takes them all (up to
    `max_batch` images). A lone request never waits for company, and with 16 clients a
    pass serves several at once: one 8-image pass costs about what two 1-image passes do.
    torch gets one intra-op thread here: with two cores the event loop needs the other,
    and a second OpenMP thread spin-waits against it (and other processes) instead.
    """

    def __init__(self, predictor: ProbabilityModel, max_batch: int = 64, torch_threads: int | None = 1) -> None:
        self.predictor, self.max_batch, self._torch_threads = predictor, max_batch, torch_threads
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="digitlab-inference", daemon=True)
        self._thread.start()
        self._closed = False
        self.passes = self.images = 0  # forward passes and images so far, shown by /healthz

    async def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) probabilities for uint8 (N, 28, 28), computed on the inference thread."""
        if self._closed:
            raise RuntimeError("the inference thread has stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(images, loop, future))
        return await future

    def predict_proba_blocking(self, images: np.ndarray) -> np.ndarray:
        """The same from outside the event loop (warm-up at start-up)."""
        done = threading.Event()
        job = _Job(images, None, None, done)
        self._queue.put(job)
        done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None  # set with error None by finish()
        return job.result

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
        while (job := self._queue.get()) is not None:
            jobs, count = [job], len(job.images)
            while count < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # closing: finish this batch, then stop
                    self._queue.put(None)
                    break
                jobs.append(nxt)
                count += len(nxt.images)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            probs = self.predictor.predict_proba(images)
            self.passes, self.images = self.passes + 1, self.images + len(images)
        except Exception as exc:  # handed to each waiting request, never kills the thread
            for job in jobs:
                job.finish(None, exc)
            return
        start = 0
        for job in jobs:
            job.finish(probs[start : start + len(job.images)], None)
            start += len(job.images)


@dataclass
class _Job:
    images: np.ndarray  # (N, 28, 28) uint8
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future | None
    done: threading.Event | None = None
    result: np.ndarray | None = None
    error: BaseException | None = None

    def finish(self, result: np.ndarray | None, error: BaseException | None) -> None:
        if self.loop is None or self.future is None:  # a blocking job: predict_proba_blocking waits on `done`
            self.result, self.error = result, error
            if self.done is not None:
                self.done.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (server shutting down)
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future, result: np.ndarray | None, error: BaseException | None) -> None:
    if future.cancelled():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def decode_upload(data: bytes, limits: Limits) -> Image.Image:
    """Bytes of one image file -> a loaded PIL image, refusing non-images and oversized ones."""
    if not data:
        raise ApiError(422, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning (more pixels than PIL's default cap) is refused as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size  # from the header: nothing is decoded yet
            if max(width, height) > limits.max_side:
                raise ApiError(413, f"image is {width}x{height} pixels; the limit is {limits.max_side} "
                               "pixels per side")
            reduce_while_decoding(image, limits.max_pixels)
            if image.size[0] * image.size[1] > limits.max_pixels:
                raise ApiError(413, f"image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
                               f"the limit is {limits.max_pixels / 1e6:.1f} megapixels")
            image.load()
            image = upright(image)
            if image.mode == "RGBA" and cast(Any, image.getextrema())[3] == (255, 255):
                # Canvas PNGs are RGBA but opaque: compositing onto white would change nothing
                # and costs more than the rest of the preprocessing.
                image = image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"image has too many pixels (limit {limits.max_side} per side)") from None
    except UnidentifiedImageError:
        raise ApiError(415, f"the upload is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
                       ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt file
        raise ApiError(422, f"the image file is damaged ({exc.__class__.__name__})") from None
    return image


# Images above this (512x512) decode `max_decoding` at a time and trim the heap after: one costs
# up to ~75 MB at the 4-megapixel limit; below it one costs < 10 MB, too little to queue or trim for.
SMALL_IMAGE_PIXELS = 512 * 512


def _header_pixels(data: bytes) -> int:
    """Width x height from the image header (nothing decoded); 0 when unreadable (decode_upload says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return image.size[0] * image.size[1]
    except Exception:  # any failure is reported properly by decode_upload
        return 0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to call
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim).

    A large image's buffers, freed, stay in glibc's per-thread arenas: 16 concurrent
    2048x2048 uploads left the server ~130 MB larger for good. A trim took ~1.4 ms (contended).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def parse_json_images(body: bytes, limits: Limits) -> tuple[np.ndarray, bool]:
    """JSON body -> (uint8 (N, 28, 28), is_batch)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno} column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(422, f"the body is not valid JSON{where}") from None
    except RecursionError:  # [[[[...]]]] nested deeper than Python's parser goes
        raise ApiError(422, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer longer than int's max_str_digits (4300): no pixel value
        raise ApiError(422, f"the body holds a number Python refuses to read ({exc})") from None
    usage = 'expected {"pixels": [784 numbers]} or {"images": [[784 numbers], ...]}'
    if not isinstance(payload, dict) or ("pixels" in payload) == ("images" in payload):
        raise ApiError(422, usage)
    if "pixels" in payload:
        return as_uint8_images(payload["pixels"], "pixels", one=True)[None], False
    images = payload["images"]
    if not isinstance(images, list) or not images:
        raise ApiError(422, "images: expected a non-empty list of images, each 784 numbers")
    if len(images) > limits.max_batch:
        raise ApiError(413, f"images: {len(images)} images; the limit is {limits.max_batch} per request")
    return np.stack([as_uint8_images(item, f"images[{i}]", one=True) for i, item in enumerate(images)]), True


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf (e.g. a metric never computed) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _predictions(probs: np.ndarray, images: np.ndarray, min_confidence: float = DEFAULT_MIN_CONFIDENCE
                 ) -> list[dict[str, Any]]:
    """Response objects; plain Python on lists, for the same reason as in digitlab.pixels."""
    out = []
    reasons = abstain_reasons(images, probs, min_confidence)
    for p, image, reason in zip(probs.tolist(), images.tolist(), reasons, strict=True):
        digit = max(range(len(p)), key=p.__getitem__)
        out.append({
            "digit": digit,
            "probability": round(p[digit], 6),
            "probabilities": [round(v, 6) for v in p],
            "uncertain": reason is not None,
            "reason": reason,
            "image": image,
        })
    return out


# ---------------------------------------------------------------- the app


def _load(model: str | Path | ProbabilityModel, backend: str) -> ProbabilityModel:
    if not isinstance(model, str | Path):
        return model
    from digitlab.inference import load_predictor

    if backend == "onnx":
        from digitlab.export import load_onnx_predictor

        try:
            # One ORT thread, as for torch in BatchingPredictor.
            return load_onnx_predictor(model, threads=1)
        except DigitlabError:
            raise
        except Exception as exc:  # the exporter met something it cannot translate
            raise DigitlabError(f"{model}: cannot run in ONNX Runtime ({exc.__class__.__name__}: {exc}); "
                                "serve it with backend torch instead") from None
    return load_predictor(model)


def model_info(predictor: ProbabilityModel, limits: Limits) -> dict[str, Any]:
    from digitlab.export import model_fingerprint

    meta = predictor.meta
    return _finite({
        "preset": meta.get("preset"),
        "model": meta.get("model") or ("ensemble" if "member_meta" in meta else None),
        "backend": predictor.backend,
        "precision": predictor.precision,
        "members": predictor.members,
        "parameters": meta.get("parameters"),
        "fingerprint": meta.get("fingerprint") or model_fingerprint(meta),
        "train_fingerprint": meta.get("data", {}).get("train_fingerprint"),
        "metrics": meta.get("metrics", {}),
        "class_names": meta.get("class_names", [str(d) for d in range(10)]),
        "input": meta.get("input"),
        "limits": asdict(limits),
    })


def create_app(model: str | Path | ProbabilityModel, *, backend: str = "onnx", limits: Limits | None = None,
               torch_threads: int | None = 1) -> FastAPI:
    """The app for one model: a run/ensemble folder (loaded now, once) or a loaded predictor.

    backend "onnx" (default) serves a folder through ONNX Runtime, "torch" through torch. ORT
    runs a whole batch in one call that releases the interpreter lock once; torch releases and
    retakes it around every op, and each retake queues behind the event loop's Python work:
    with 16 clients on 2 cores ORT served 1.2-1.6x the requests/s (benchmarks/serve_load.py), and a
    lone request takes ~1 ms instead of ~2 ms.
    `torch_threads` sets torch's intra-op threads on the inference thread (None: leave as is).
    """
    limits = limits or Limits()
    predictor = _load(model, backend)
    inference = BatchingPredictor(predictor, torch_threads=torch_threads)
    inference.predict_proba_blocking(np.zeros((1, 28, 28), np.uint8))  # warm-up: the first pass is slow
    pipeline = _Pipeline(inference, limits, min_confidence(predictor.meta))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        inference.close()

    app = FastAPI(
        title="digitlab",
        summary="Handwritten-digit recognition with a trained digitlab model",
        description="POST one image (multipart field `file`, PNG/JPEG, any size: MNIST-style "
        "preprocessing) or JSON pixels (28x28 MNIST-style, 0..255, white ink on black) to "
        "`/v1/predict`. The drawing page is at `/`.",
        version=str(predictor.meta.get("versions", {}).get("digitlab", "")) or "0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    add_offline_docs(app)
    app.state.predictor, app.state.limits = predictor, limits
    _add_error_handlers(app)
    _add_routes(app, pipeline, model_info(predictor, limits))
    return app


class _Pipeline:
    """One request's way: body -> images (worker threads) -> the inference thread -> JSON bytes."""

    def __init__(self, inference: BatchingPredictor, limits: Limits, threshold: float) -> None:
        self.inference, self.limits, self.threshold = inference, limits, threshold
        self.large_decodes = asyncio.Semaphore(limits.max_decoding)

    def preprocess_upload(self, data: bytes, large: bool) -> np.ndarray:
        from digitlab.data.preprocess import mnist_style_or_blank

        image = decode_upload(data, self.limits)
        try:
            return mnist_style_or_blank(image, name="upload")[None]  # (1, 28, 28)
        finally:
            del image
            if large:
                trim_heap()

    def render(self, probs: np.ndarray, images: np.ndarray, batch: bool) -> bytes:
        predictions = _predictions(probs, images, self.threshold)
        return json.dumps({"predictions": predictions} if batch else predictions[0],
                          separators=(",", ":")).encode()

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        # anyio's shared pool (40 threads), not a pool of one per core: images that finish
        # preprocessing together reach the inference thread together and share a pass,
        # which saves more than the extra threads cost (measured: 3.0 vs 3.8 ms CPU per upload).
        return await anyio.to_thread.run_sync(fn, *args)

    async def off_loop_if_large(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """Small work (one image's JSON: ~0.1 ms) inline; anything bigger on a worker thread."""
        return fn(*args) if size <= INLINE_BYTES else await self.off_loop(fn, *args)

    async def decode(self, data: bytes) -> np.ndarray:
        """An upload decoded and preprocessed on a worker thread; large ones `max_decoding` at a time.

        Small images (the drawing page's 280x280 PNGs) skip the queue: decoded in parallel they
        reach the inference thread together and share a pass. Waiting here rather than on a
        worker thread keeps large decodes on few threads, hence few malloc arenas: with a
        thread-side lock 16 uploads at 2048x2048 left +246 MB resident, this way +21 to +69 MB.
        """
        large = _header_pixels(data) > SMALL_IMAGE_PIXELS  # header only: 13-200 us on the loop
        async with self.large_decodes if large else contextlib.nullcontext():
            return await self.off_loop(self.preprocess_upload, data, large)

    async def answer(self, images: np.ndarray, batch: bool) -> Response:
        probs = await self.inference.predict_proba(images)
        body = await self.off_loop_if_large(len(images) * PIXELS * 4, self.render, probs, images, batch)
        return Response(body, media_type="application/json")

    async def predict(self, request: Request) -> Response:
        limits = self.limits
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            body = await _read_body(request, limits.max_upload_bytes + MULTIPART_OVERHEAD, "upload")
            data = await _multipart_file(request, body, limits)
            return await self.answer(await self.decode(data), False)
        if content_type.startswith("image/"):
            data = await _read_body(request, limits.max_upload_bytes, "upload")
            return await self.answer(await self.decode(data), False)
        if content_type == "application/json" or content_type.endswith("+json"):
            body = await _read_body(request, limits.max_json_bytes, "JSON body")
            return await self.answer(*await self.off_loop_if_large(len(body), parse_json_images, body, limits))
        raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                       "with the image in field 'file', or application/json with 'pixels' or 'images'")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(DigitlabError)
    async def digitlab_error(_: Request, exc: DigitlabError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody reads the answer; one line, no traceback: an aborting client must not flood the log.
        log.info("%s %s: the client disconnected before sending its whole body", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({exc.__class__.__name__})"}, status_code=500)


def _add_routes(app: FastAPI, pipeline: _Pipeline, info: dict[str, Any]) -> None:
    errors: dict[int | str, dict[str, Any]] = {status: {"model": ErrorOut} for status in (413, 415, 422)}

    @app.post("/v1/predict", response_model=None, openapi_extra=PREDICT_BODY,
              responses={200: {"model": PredictionOut | BatchPredictionOut}, **errors})
    async def predict(request: Request) -> Response:
        """Predict one image (upload or `pixels`) or a batch (`images`, up to 256)."""
        return await pipeline.predict(request)

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """Preset, metrics, weights fingerprint, parameter count, input contract and limits."""
        return info

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, and how many images the model has seen in how many forward passes."""
        return {"status": "ok", "images": pipeline.inference.images, "passes": pipeline.inference.passes}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused with 413 as soon as it exceeds `limit` (declared or actual)."""
    mb = f"{limit / 1024 / 1024:.0f} MB" if limit >= 1024 * 1024 else f"{limit} bytes"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} of {int(declared):,} bytes is larger than the limit of {mb}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is larger than the limit of {mb}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_file(request: Request, body: bytes, limits: Limits) -> bytes:
    """The bytes of the multipart field `file` of an already size-checked body."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart upload needs the image as a file in field 'file'")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"upload of {len(data):,} bytes is larger than the limit of "
                       f"{limits.max_upload_bytes / 1024 / 1024:.0f} MB")
    return data


def check_can_listen(host: str, port: int) -> None:
    """Bind every address `host` resolves to, with the options asyncio's server uses (which uvicorn
    runs on), and let go: a DigitlabError saying why the server could not listen there, else
    nothing. Like asyncio, an address this machine does not have is skipped while another binds."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DigitlabError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    unavailable: OSError | None = None
    bound = 0
    for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], None, i[4]) for i in infos):
        with socket.socket(family, kind, proto) as sock:
            if os.name == "posix":  # as asyncio: elsewhere it would let two servers share a port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                bound += 1
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise DigitlabError(f"cannot listen on {where}: {_why_not_listening(exc, port)}") from None
                unavailable = exc
    if not bound and unavailable is not None:
        raise DigitlabError(f"cannot listen on {where}: {_why_not_listening(unavailable, port)}")


def _why_not_listening(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "another program (another digitlab serve?) listens there; choose another --port"
    if exc.errno == errno.EACCES and port < 1024:
        return "ports below 1024 need administrator rights; choose --port 1024 or above"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine; use --host 127.0.0.1 (this machine) or 0.0.0.0 (all)"
    return exc.strerror or str(exc)


def run_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, backend: str = "onnx",
               access_log: bool = False) -> None:
    """Load the model, then serve until Ctrl-C (uvicorn, one process).

    Idle and slow clients are dropped and capped per address (`digitlab.serve.guard`); more than
    1,024 requests in progress answer 503.
    """
    import uvicorn

    from digitlab.serve.guard import InFlightLimit, serve_options

    check_can_listen(host, port)  # before the model loads: a busy port is said at once, as a usage error
    app = create_app(run_dir, backend=backend)
    # Everything loaded so far (torch, FastAPI, the model) lives as long as the process; frozen,
    # the collector's full passes skip it: they took ~100 ms and showed as latency outliers.
    gc.collect()
    gc.freeze()
    uvicorn.run(InFlightLimit(app, 1024), host=host, port=port, access_log=access_log, log_level="info",
                **serve_options())
