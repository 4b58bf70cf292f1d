"""Fetch the four official MNIST IDX files over HTTP(S) with urllib, trying mirrors in order.

A file only gets its final name after it is verified (pinned checksum and IDX header), so the
target folder never holds a partial or corrupt copy under an official name.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from digitlab.data.idx import idx_header
from digitlab.errors import DigitlabError

log = logging.getLogger(__name__)

MIRRORS_ENV = "DIGITLAB_MNIST_MIRRORS"
BUILTIN_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",  # the original; plain HTTP is fine, content is pinned
)
# Some servers refuse urllib's default agent; name ourselves instead.
USER_AGENT = "digitlab-mnist-download/1 (python urllib)"
_CHUNK = 1 << 16  # bytes per read: small enough for steady progress, big enough to be cheap


@dataclass(frozen=True)
class MnistFile:
    """One official file: what its IDX header declares and the checksums that identify it."""

    name: str
    shape: tuple[int, ...]
    gz_sha256: str  # of the official .gz download
    raw_md5: str  # of its uncompressed content, so a re-compressed copy is accepted too

    @property
    def idx_header(self) -> bytes:
        return idx_header(self.shape)

    @property
    def raw_size(self) -> int:
        return len(self.idx_header) + prod(self.shape)

    @property
    def max_download(self) -> int:
        # gzip never grows data by more than a few bytes per 16 KB block: anything bigger
        # than this is not MNIST, and we stop reading instead of filling the disk.
        return self.raw_size + self.raw_size // 1000 + 1024


# The .gz sha256 values are the official downloads'. The md5s are of the uncompressed
# content: train-images' is the published one; the other three were computed from copies
# whose .gz sha256 matches the official value.
MNIST_FILES = (
    MnistFile(
        "train-images-idx3-ubyte.gz",
        (60000, 28, 28),
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    MnistFile(
        "train-labels-idx1-ubyte.gz",
        (60000,),
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "a25bea736e30d166cdddb491f175f624",
    ),
    MnistFile(
        "t10k-images-idx3-ubyte.gz",
        (10000, 28, 28),
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "2646ac647ad5339dbf082846283269ea",
    ),
    MnistFile(
        "t10k-labels-idx1-ubyte.gz",
        (10000,),
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "27ae3e4e09519cfbb04c329615203637",
    ),
)


class _Rejected(Exception):
    """One mirror's copy of one file cannot be used; the message says why."""


def mirror_list(mirrors: Sequence[str] | None = None) -> list[str]:
    """Base URLs in the order tried: `mirrors`, then $DIGITLAB_MNIST_MIRRORS or the built-ins.

    The variable is comma-separated and replaces the built-in list (tests and air-gapped
    sites point it at their own server). A base without a scheme is a local folder.
    """
    from_env = [m for m in os.environ.get(MIRRORS_ENV, "").split(",") if m.strip()]
    bases: list[str] = []
    for base in [*(mirrors or []), *(from_env or BUILTIN_MIRRORS)]:
        base = base.strip()
        if "://" not in base:
            base = Path(base).expanduser().resolve().as_uri()
        if not base.endswith("/"):
            base += "/"
        if base not in bases:
            bases.append(base)
    return bases


def file_problem(path: Path, spec: MnistFile) -> str | None:
    """Why `path` is not a good copy of `spec`, or None when it is one."""
    sha256 = hashlib.sha256()
    # md5 identifies the published content here; it is not used to resist forgery alone
    # (the IDX header and exact size must match too, and a second preimage is out of reach).
    md5 = hashlib.md5(usedforsecurity=False)
    head, size = b"", 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                sha256.update(chunk)
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 20):
                if len(head) < len(spec.idx_header):
                    head = (head + chunk)[: len(spec.idx_header)]
                md5.update(chunk)
                size += len(chunk)
                if size > spec.raw_size:
                    return f"decompresses to more than the expected {spec.raw_size:,} bytes"
    except (OSError, EOFError, zlib.error) as exc:
        return f"not valid gzip data ({exc})"
    if head != spec.idx_header:
        return (
            f"IDX header {head.hex()} is not the expected {spec.idx_header.hex()} "
            f"(unsigned bytes of shape {spec.shape})"
        )
    if size != spec.raw_size:
        return f"decompresses to {size:,} bytes, expected {spec.raw_size:,}"
    if sha256.hexdigest() == spec.gz_sha256:
        return None
    if md5.hexdigest() == spec.raw_md5:
        log.info("%s: re-compressed copy; its uncompressed content is the official one", path)
        return None
    return (
        f"checksum mismatch: sha256 {sha256.hexdigest()} is not the official "
        f"{spec.gz_sha256}, and the uncompressed md5 {md5.hexdigest()} is not {spec.raw_md5}"
    )


def _fetch(url: str, target: Path, spec: MnistFile, timeout: float) -> int:
    """Stream `url` into the new file `target`; return its size or raise _Rejected."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, target.open("xb") as out:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > spec.max_download:
                raise _Rejected(f"announces {int(declared):,} bytes, more than {spec.name} can be")
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > spec.max_download:
                    raise _Rejected(f"sent more than {spec.max_download:,} bytes, more than "
                                    f"{spec.name} can be")
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the open response
        raise _Rejected(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _Rejected(f"no answer within {timeout:g} s") from None
        raise _Rejected(str(exc.reason)) from None
    except TimeoutError:
        raise _Rejected(f"stalled for more than {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # connection reset, incomplete read, malformed URL, disk full...
        raise _Rejected(f"{type(exc).__name__}: {exc}") from None
    return size


def _human_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _ensure_file(
    directory: Path, spec: MnistFile, bases: list[str], timeout: float, say: Callable[[str], None]
) -> None:
    final = directory / spec.name
    if final.is_file():
        problem = file_problem(final, spec)
        if problem is None:
            say(f"{spec.name}: already present, verified")
            return
        # info, not warning: `progress` already tells the user, and the CLI shows warnings too
        log.info("%s: existing file is not valid (%s); fetching it again", final, problem)
        say(f"{spec.name}: existing file is not valid ({problem}); fetching it again")
    failures: list[str] = []
    for base in bases:
        url = base + spec.name
        # A unique hidden name: concurrent downloads into one folder never share a temp file,
        # and load_idx_dir never mistakes it for the real one.
        part = directory / f".{spec.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
        log.info("fetching %s", url)
        try:
            size = _fetch(url, part, spec, timeout)
            if problem := file_problem(part, spec):
                raise _Rejected(problem)
            os.replace(part, final)  # atomic: the official name only ever holds a verified file
        except _Rejected as exc:
            failures.append(f"{base}: {exc}")
            log.info("%s: %s", url, exc)
            say(f"fetching {spec.name} from {base} ... failed: {exc}")
            continue
        finally:
            part.unlink(missing_ok=True)
        say(f"fetching {spec.name} from {base} ... ok ({_human_size(size)})")
        return
    raise DigitlabError(
        f"could not fetch {spec.name} from any of {len(bases)} mirror(s): " + "; ".join(failures)
    )


def download_mnist(
    directory: Path,
    mirrors: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Make `directory` hold the four verified official MNIST .gz files; return it.

    `mirrors` are base URLs tried before the built-ins (see `mirror_list`); files already
    present and valid are kept. `timeout` (seconds) bounds each connect and each read, not
    the whole transfer. `progress` receives one line per file and attempt.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DigitlabError(f"{directory}: cannot create directory ({exc.strerror})") from None
    bases = mirror_list(mirrors)
    say = progress or (lambda _message: None)
    for spec in MNIST_FILES:
        _ensure_file(directory, spec, bases, timeout, say)
    return directory
