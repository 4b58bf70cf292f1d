"""The HTTP API through FastAPI's TestClient: every route, every refused input, and its message.

One app serves the session's tiny trained run; a few tests build their own with tighter limits.
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from digitlab.data import DigitData
from digitlab.data.preprocess import mnist_style
from digitlab.inference import load_predictor
from digitlab.serve import Limits, create_app
from digitlab.serve.app import STATIC_DIR

with warnings.catch_warnings():  # Starlette nudges towards httpx2, which is not what FastAPI ships with
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def predictor(tiny_run: Path):
    return load_predictor(tiny_run)


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    with TestClient(create_app(predictor)) as c:
        yield c


def _drawn_one(size: int = 300, dark_on_light: bool = True) -> Image.Image:
    """A thick vertical stroke: a "1" as drawn on paper (or on the page's black canvas)."""
    background, ink = (255, 0) if dark_on_light else (0, 255)
    image = Image.new("L", (size, size), background)
    ImageDraw.Draw(image).line([(size // 2, size // 6), (size // 2, 5 * size // 6)], fill=ink,
                               width=size // 14)
    return image


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _upload(client: TestClient, data: bytes, name: str = "digit.png", mime: str = "image/png"):
    return client.post("/v1/predict", files={"file": (name, data, mime)})


def _assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"], response.json()


# ---------------------------------------------------------------- routes


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["images"] >= 1 and body["passes"] >= 1  # the warm-up pass


def test_model_info(client: TestClient, tiny_run: Path) -> None:
    meta = json.loads((tiny_run / "model.json").read_text())
    info = client.get("/v1/model").json()
    assert info["preset"] == "quick"
    assert info["model"] == "seed2017"
    assert info["parameters"] == meta["parameters"] == 594_922
    assert info["fingerprint"] == meta["weights_sha256"][:16]
    assert info["train_fingerprint"] == meta["data"]["train_fingerprint"]
    assert info["metrics"]["val_acc"] == pytest.approx(meta["metrics"]["val_acc"])
    assert info["input"]["polarity"] == "light-on-dark"
    assert info["limits"] == {"max_upload_bytes": 2 * 1024 * 1024, "max_json_bytes": 8 * 1024 * 1024,
                              "max_side": 4096, "max_pixels": 2048 * 2048, "max_decoding": 2, "max_batch": 256}


def test_predict_pixels_matches_the_predictor(client: TestClient, predictor, mnist_test: DigitData) -> None:
    image = mnist_test.images[0]
    body = client.post("/v1/predict", json={"pixels": image.ravel().tolist()}).json()
    expected = predictor.predict_proba(image[None])[0]
    assert body["digit"] == int(expected.argmax()) == mnist_test.labels[0]
    assert body["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert np.allclose(body["probabilities"], expected, atol=1e-6)
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert np.array_equal(np.array(body["image"], dtype=np.uint8), image)  # pixels are used as given


def test_predict_pixels_as_28_rows_and_as_floats(client: TestClient, mnist_test: DigitData) -> None:
    image = mnist_test.images[1]
    rows = client.post("/v1/predict", json={"pixels": image.tolist()}).json()
    floats = client.post("/v1/predict", json={"pixels": np.minimum(image.ravel() + 0.2, 255).tolist()}).json()
    assert rows["digit"] == floats["digit"] == mnist_test.labels[1]
    assert rows["image"] == floats["image"] == image.tolist()  # 0.2 above rounds back


def test_predict_batch(client: TestClient, predictor, mnist_test: DigitData) -> None:
    images = mnist_test.images[:16]
    response = client.post("/v1/predict", json={"images": images.reshape(16, -1).tolist()})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert len(predictions) == 16
    expected = predictor.predict_proba(images)
    assert [p["digit"] for p in predictions] == expected.argmax(1).tolist()
    assert np.allclose([p["probabilities"] for p in predictions], expected, atol=1e-6)
    assert (np.array([p["digit"] for p in predictions]) == mnist_test.labels[:16]).mean() >= 0.9


def test_predict_upload_png_and_jpeg(client: TestClient) -> None:
    for image, fmt, mime in [(_drawn_one(), "PNG", "image/png"), (_drawn_one(450, False), "JPEG", "image/jpeg")]:
        response = _upload(client, _encode(image, fmt), f"one.{fmt.lower()}", mime)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["digit"] == 1
        assert np.array(body["image"]).shape == (28, 28)


def test_upload_gets_the_same_preprocessing_as_predict(client: TestClient, tmp_path: Path) -> None:
    from digitlab.data.preprocess import load_image_file

    path = tmp_path / "one.png"
    rgba = _drawn_one().convert("RGBA")
    rgba.save(path)
    body = _upload(client, path.read_bytes()).json()
    assert np.array_equal(np.array(body["image"], dtype=np.uint8), load_image_file(path))


def test_upload_with_exif_orientation_is_read_upright(client: TestClient, tmp_path: Path) -> None:
    from digitlab.data.preprocess import load_image_file

    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    path = tmp_path / "one.jpg"
    _drawn_one(450, False).transpose(Image.Transpose.ROTATE_270).save(path, exif=exif, quality=95)
    body = _upload(client, path.read_bytes(), "one.jpg", "image/jpeg").json()
    assert body["digit"] == 1
    assert np.array_equal(np.array(body["image"], dtype=np.uint8), load_image_file(path))


def test_raw_image_body(client: TestClient) -> None:
    response = client.post("/v1/predict", content=_encode(_drawn_one()), headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["digit"] == 1


def test_page_and_static_files_load_nothing_external(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "<canvas" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text and "//cdn" not in response.text
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"index.html", "app.js", "style.css"}


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "/v1/model" in schema["paths"] and "/healthz" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/v2/predict").status_code == 404
    assert client.get("/v1/predict").status_code == 405


# ---------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(("payload", "status", "fragment"), [
    ({"pixels": [0] * 783}, 422, "expected 784 numbers (28x28), got shape [783]"),
    ({"pixels": [[0] * 28] * 27}, 422, "got shape [27, 28]"),
    ({"pixels": [0] * 783 + [256]}, 422, "values must lie in 0..255; found 256"),
    ({"pixels": [-1] + [0] * 783}, 422, "values must lie in 0..255; found -1"),
    ({"pixels": ["7"] * 784}, 422, "expected numbers in 0..255, 784 per image"),
    ({"pixels": [None] * 784}, 422, "expected numbers in 0..255, 784 per image"),
    ({"pixels": [True] * 784}, 422, "expected numbers in 0..255, 784 per image"),
    ({"pixels": [[0] * 28] * 27 + [[0] * 27]}, 422, "expected numbers in 0..255, 784 per image"),
    ({"pixels": 5}, 422, "got shape []"),
    ({"images": []}, 422, "images: expected a non-empty list"),
    ({"images": [[0] * 784, [0] * 784, [0] * 10]}, 422, "images[2]: expected 784 numbers"),
    ({"images": [[0] * 784] * 257}, 413, "images: 257 images; the limit is 256 per request"),
    ({"pixel": [0] * 784}, 422, 'expected {"pixels": [784 numbers]} or {"images"'),
    ({"pixels": [0] * 784, "images": [[0] * 784]}, 422, 'expected {"pixels"'),
    ([0] * 784, 422, 'expected {"pixels"'),
])
def test_bad_json(client: TestClient, payload, status: int, fragment: str) -> None:
    _assert_error(client.post("/v1/predict", json=payload), status, fragment)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_pixels(client: TestClient, literal: str) -> None:
    body = '{"pixels": [' + ", ".join([literal] + ["0"] * 783) + "]}"  # Python's json accepts these
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    _assert_error(response, 422, "values must be finite numbers in 0..255; found NaN or infinity")


def test_invalid_json(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b'{"pixels": [1, 2', headers={"content-type": "application/json"})
    _assert_error(response, 422, "the body is not valid JSON (line 1")


def test_deeply_nested_json(client: TestClient) -> None:
    body = '{"pixels": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    _assert_error(response, 422, "nested too deeply")


def test_non_image_upload(client: TestClient) -> None:
    _assert_error(_upload(client, b"this is not a picture"), 415, "not an image in a supported format")
    _assert_error(_upload(client, b"%!PS-Adobe-3.0 EPSF-3.0\n"), 415, "not an image")  # EPS is never decoded


def test_truncated_image(client: TestClient) -> None:
    data = _encode(Image.effect_noise((200, 200), 60))
    _assert_error(_upload(client, data[: len(data) // 3]), 422, "the image file is damaged")


def test_empty_and_blank_upload(client: TestClient) -> None:
    _assert_error(_upload(client, b""), 422, "the uploaded file is empty")

    blank_upload = _upload(client, _encode(Image.new("L", (64, 64), 255)))
    blank_json = client.post("/v1/predict", json={"pixels": [0] * 784})
    assert blank_upload.status_code == blank_json.status_code == 200
    assert blank_upload.json() == blank_json.json()  # one answer for "nothing drawn", however it arrives
    assert blank_json.json()["uncertain"] is True
    assert blank_json.json()["reason"] == "too little ink"


def test_a_drawn_digit_is_not_flagged_as_too_little_ink(client: TestClient) -> None:
    body = _upload(client, _encode(_drawn_one())).json()
    assert body["reason"] != "too little ink"
    assert isinstance(body["uncertain"], bool)


def test_upload_in_the_wrong_field(client: TestClient) -> None:
    response = client.post("/v1/predict", files={"image": ("one.png", _encode(_drawn_one()), "image/png")})
    _assert_error(response, 422, "needs the image as a file in field 'file'")
    response = client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("a", b"b")})
    _assert_error(response, 422, "field 'file'")


def test_unsupported_content_type(client: TestClient) -> None:
    _assert_error(client.post("/v1/predict", content=b"7", headers={"content-type": "text/plain"}), 415,
                  "unsupported content type 'text/plain'")
    _assert_error(client.post("/v1/predict", content=b"7"), 415, "unsupported content type")


def test_upload_too_large(client: TestClient) -> None:
    big = b"\x89PNG" + bytes(2 * 1024 * 1024)
    _assert_error(_upload(client, big), 413, "is larger than the limit of 2 MB")
    raw = client.post("/v1/predict", content=big, headers={"content-type": "image/png"})
    _assert_error(raw, 413, "upload of 2,097,156 bytes is larger than the limit of 2 MB")


def test_body_too_large_without_content_length(predictor) -> None:
    """A chunked body is counted as it arrives and cut off at the limit."""
    limits = Limits(max_json_bytes=10_000)
    with TestClient(create_app(predictor, limits=limits)) as small:
        chunks = (b"[" + b"0," * 1000 for _ in range(20))  # a generator: sent chunked, no length
        response = small.post("/v1/predict", content=chunks, headers={"content-type": "application/json"})
        _assert_error(response, 413, "JSON body is larger than the limit of 10000 bytes")


def test_image_too_wide(client: TestClient) -> None:
    wide = _encode(Image.new("L", (4097, 8), 0))  # a few hundred bytes, refused before decoding
    _assert_error(_upload(client, wide), 413, "image is 4097x8 pixels; the limit is 4096 pixels per side")


def test_decompression_bomb(predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's pixel-count guard (scaled down here) is refused as 413, warning and error alike."""
    with TestClient(create_app(predictor)) as fresh:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        for side in (40, 100):  # 1,600 pixels: PIL warns; 10,000 (> 2x): PIL raises
            _assert_error(_upload(fresh, _encode(_drawn_one(side))), 413, "image has too many pixels")


def test_server_survives_bad_requests(client: TestClient, mnist_test: DigitData) -> None:
    for _ in range(3):
        _upload(client, b"junk")
        client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
    results: list[int] = []

    def ask(i: int) -> None:
        response = client.post("/v1/predict", json={"pixels": mnist_test.images[i].ravel().tolist()})
        results.append(response.status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- batching


class SlowModel:
    """Stands in for a predictor: 30 ms per pass, remembers batch sizes, fails on request."""

    meta: dict = {}  # noqa: RUF012
    precision = "fp32"

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import time

        self.batch_sizes.append(len(images))
        time.sleep(0.03)
        if (images == 13).all(axis=(1, 2)).any():
            raise ValueError("unlucky image")
        probs = np.zeros((len(images), 10), np.float32)
        probs[np.arange(len(images)), images[:, 0, 0] % 10] = 1  # "predict" the first pixel
        return probs


def test_waiting_requests_share_a_forward_pass() -> None:
    import asyncio

    from digitlab.serve.app import BatchingPredictor

    model = SlowModel()
    batcher = BatchingPredictor(model, torch_threads=None)

    async def many() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.predict_proba(np.full((1, 28, 28), i, np.uint8))
                                      for i in range(10)))

    try:
        results = asyncio.run(many())
        # each caller gets its own row back, whatever batch it rode in
        assert [int(r.argmax()) for r in results] == list(range(10))
        assert sum(model.batch_sizes) == 10 and len(model.batch_sizes) <= 3  # not ten passes
        assert (batcher.passes, batcher.images) == (len(model.batch_sizes), 10)
    finally:
        batcher.close()


def test_a_failing_pass_fails_its_requests_only() -> None:
    import asyncio

    from digitlab.serve.app import BatchingPredictor

    batcher = BatchingPredictor(SlowModel(), torch_threads=None)

    async def run() -> tuple[list, np.ndarray]:
        bad = await asyncio.gather(batcher.predict_proba(np.full((1, 28, 28), 13, np.uint8)),
                                   return_exceptions=True)
        return bad, await batcher.predict_proba(np.full((1, 28, 28), 4, np.uint8))

    try:
        bad, good = asyncio.run(run())
        assert isinstance(bad[0], ValueError) and "unlucky" in str(bad[0])
        assert int(good.argmax()) == 4  # the thread lives on
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(batcher.predict_proba(np.zeros((1, 28, 28), np.uint8)))


# ---------------------------------------------------------------- building the app


@pytest.mark.parametrize("backend", ["onnx", "torch", None])
def test_app_from_a_run_folder(tiny_run: Path, mnist_test: DigitData, backend: str | None) -> None:
    app = create_app(tiny_run) if backend is None else create_app(tiny_run, backend=backend)
    with TestClient(app) as folder_client:
        info = folder_client.get("/v1/model").json()
        assert info["backend"] == (backend or "onnx") and info["preset"] == "quick"
        body = folder_client.post("/v1/predict", json={"pixels": mnist_test.images[0].ravel().tolist()}).json()
        assert body["digit"] == mnist_test.labels[0]


def test_app_from_a_missing_folder_fails_at_start(tmp_path: Path) -> None:
    from digitlab.errors import DigitlabError

    with pytest.raises(DigitlabError, match="no such run folder"):
        create_app(tmp_path / "nope")


def test_onnx_failure_names_the_way_out(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import digitlab.export
    from digitlab.errors import DigitlabError

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(digitlab.export, "load_onnx_predictor", unsupported)
    with pytest.raises(DigitlabError, match=r"cannot run in ONNX Runtime .* with backend torch instead"):
        create_app(tiny_run)


def test_serve_cli_flags() -> None:
    from digitlab.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.backend) == ("127.0.0.1", 8000, "onnx")
    args = build_parser().parse_args(["serve", "runs/x", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port) == ("0.0.0.0", 9000)


def test_mnist_style_is_what_the_upload_route_uses(client: TestClient) -> None:
    image = _drawn_one(120)
    body = _upload(client, _encode(image)).json()
    assert body["image"] == mnist_style(image).tolist()
