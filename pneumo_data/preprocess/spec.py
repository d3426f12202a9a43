"""The settings of stage (a) (:class:`PreprocessSpec`), its constants and its error.

No TensorFlow and no Pillow here: manifests, the exports' metadata and the jobs' checks read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pneumo_data.common.errors import UserError

VERSION = 1  # of the definition below; recorded with every manifest and export
RESIZE_MODES = ("stretch", "pad")
DEFAULT_STORED_SIZE = 256
DEFAULT_MAX_PIXELS = 80_000_000  # about 9000x9000; the largest Kermany X-ray is ~3000x2700
DRAFT_SCALES = (8, 4, 2, 1)  # libjpeg's DCT scales that Pillow's draft() chooses from
PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling (32 - 8 - 2)


class DecodeError(UserError):
    """The file is not a decodable image; ``str(error)`` is the reason (ingest records it as
    the file's skip reason, ``predict`` writes it into the file's row)."""


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides stage (a); ingest records it in the manifest.

    Args:
      stored_size: side S of the stored square image.
      resize: ``stretch`` (ignore the aspect ratio, as ImageDataGenerator did) or
        ``pad`` (keep it; black borders).
      fast_jpeg: decode large JPEGs at a reduced DCT scale (both sides stay >= 2S).
      max_pixels: refuse larger images (decompression bombs).
    """

    stored_size: int = DEFAULT_STORED_SIZE
    resize: str = "stretch"
    fast_jpeg: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if (isinstance(self.stored_size, bool) or not isinstance(self.stored_size, int)
                or not 8 <= self.stored_size <= 4096):
            raise UserError(f"the stored image size must be an integer in [8, 4096], "
                            f"got {self.stored_size!r}")
        if self.resize not in RESIZE_MODES:
            raise UserError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not isinstance(self.fast_jpeg, bool):
            raise UserError(f"fast_jpeg must be true or false, got {self.fast_jpeg!r}")
        if (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                or self.max_pixels < 1):
            raise UserError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        """The spec :meth:`to_dict` wrote (a manifest's, a SavedModel's or a flatbuffer's).

        Raises UserError when it was written by a later definition (``version``) or is
        malformed.
        """
        if not isinstance(data, Mapping):
            raise UserError(f"a preprocessing spec must be a JSON object, got {data!r}")
        version = data.get("version", VERSION)
        if version != VERSION:
            raise UserError(f"preprocessing definition version {version!r} is not this "
                            f"pneumo's ({VERSION}); upgrade pneumo")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise UserError(f"unknown preprocessing setting(s) {unknown}")
        return cls(**{k: data[k] for k in known if k in data})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings with the definition's ``version``."""
        return {"version": VERSION, **dataclasses.asdict(self)}


DEFAULT_SPEC = PreprocessSpec()


def draft_scale(width: int, height: int, stored_size: int, fast_jpeg: bool = True) -> int:
    """The JPEG DCT scale Pillow's ``draft("L", (2S, 2S))`` picks (1, 2, 4 or 8)."""
    if not fast_jpeg:
        return 1
    scale = min(width // (2 * stored_size), height // (2 * stored_size))
    return next((s for s in DRAFT_SCALES if scale >= s), 1)


def pad_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of the aspect-preserving image inside a ``size`` square."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))

