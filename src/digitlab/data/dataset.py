"""The one in-memory form every data source produces: uint8 images, optional int64 labels.

A fingerprint (sha256 of pixels + labels) identifies the data in run metadata; per-image
hashes (of the 784 pixel bytes) find the same digit in two sources.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from digitlab.errors import DigitlabError

IMAGE_SIDE = 28
NUM_CLASSES = 10


def fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
    """Short content hash: equal arrays give equal fingerprints whatever their source format."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def image_hashes(images: np.ndarray) -> np.ndarray:
    """(N,) uint64: an 8-byte blake2b digest of each image's 784 pixel bytes.

    Equal pixels give equal hashes whatever the source format or label; 2**64 values make an
    accidental collision among a few million images vanishingly unlikely.
    """
    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in flat)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


@dataclass(frozen=True)
class DigitData:
    """Images `(N, 28, 28)` uint8 (0 = background), labels `(N,)` int64 in 0..9 or None."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    _hashes: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3 or self.images.shape[1:] != (
            IMAGE_SIDE,
            IMAGE_SIDE,
        ):
            raise DigitlabError(
                f"{self.source}: images must be uint8 (N, 28, 28), got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.labels is not None:
            if self.labels.shape != (len(self.images),):
                raise DigitlabError(
                    f"{self.source}: {len(self.images)} images but labels of shape "
                    f"{self.labels.shape}"
                )
            if self.labels.dtype != np.int64:
                object.__setattr__(self, "labels", self.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def require_labels(self, why: str = "") -> np.ndarray:
        """The labels, or one clear error naming the source and what needed them."""
        if self.labels is None:
            raise DigitlabError(f"{self.source}: has no labels" + (f"; {why}" if why else ""))
        return self.labels

    @property
    def fingerprint(self) -> str:
        value = self._fingerprint
        if value is None:
            value = fingerprint(self.images, self.labels)
            object.__setattr__(self, "_fingerprint", value)
        return value

    def image_hashes(self) -> np.ndarray:
        """(N,) uint64 content hash of each image (see `image_hashes`), computed once."""
        value = self._hashes
        if value is None:
            value = image_hashes(self.images)
            object.__setattr__(self, "_hashes", value)
        return value

    def subset(self, index: np.ndarray, source: str | None = None) -> DigitData:
        labels = None if self.labels is None else self.labels[index]
        return DigitData(self.images[index], labels, source or f"{self.source}[subset]")

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.require_labels(), minlength=NUM_CLASSES)
