"""The configs of the stream and its augmentation (no TensorFlow here, so jobs import them
before TensorFlow is loaded).

The training job's config holds a :class:`PipelineConfig`, which holds an
:class:`AugmentConfig`; every leaf is also a flag of the training job.
"""

from __future__ import annotations

import dataclasses
import math

from pneumo_data.common.config import group, option
from pneumo_data.common.errors import UserError

AUGMENT_MODES = ("device", "host", "none")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges, units explicit; the defaults reproduce the old ImageDataGenerator
    call (``rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
    shear_range=0.1, zoom_range=0.1, horizontal_flip=True``)."""

    rotation_deg: float = option(15.0, "Rotation drawn from U(-r, r), in degrees.")
    width_shift: float = option(0.1, "Horizontal shift from U(-w, w), a fraction of the width.")
    height_shift: float = option(0.1, "Vertical shift from U(-h, h), a fraction of the height.")
    shear_deg: float = option(0.1, "Shear angle from U(-s, s), in degrees (ImageDataGenerator's "
                                   "shear_range is degrees too).")
    zoom: float = option(0.1, "x and y sampling scales drawn independently from U(1-z, 1+z).")
    horizontal_flip: bool = option(True, "Mirror left-right with probability 1/2.")

    def __post_init__(self):
        for name in ("rotation_deg", "width_shift", "height_shift", "shear_deg", "zoom"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.zoom >= 1:
            raise UserError(f"zoom must be below 1 (scale 1-zoom must stay positive), got "
                             f"{self.zoom}")
        if self.shear_deg >= 90 or self.rotation_deg > 180:
            raise UserError("shear_deg must be below 90 and rotation_deg at most 180")

    @property
    def is_identity(self) -> bool:
        return not (self.rotation_deg or self.width_shift or self.height_shift
                    or self.shear_deg or self.zoom or self.horizontal_flip)

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, False)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that shapes the training stream; the training job's flags map onto it."""

    batch_size: int = option(32, "Global batch size (all replicas together).")
    image_size: int = option(150, "Side of the square images fed to the model.")
    class_weights: str | None = option(
        None, "Target class mix of the training stream, e.g. 'normal=1,pneumonia=1' "
              "(empty: balanced).")
    augment: str = option("device", "Where augmentation runs: device (in the model), host "
                                    "(in tf.data) or none.", choices=AUGMENT_MODES)
    cache: str = option("memory", "Cache decoded images: memory, none, or a file path prefix.")
    verify_checksums: bool = option(True, "Check each shard's sha256 before streaming it.")
    augmentation: AugmentConfig = group(AugmentConfig, "Augmentation ranges.")

    def validate(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise UserError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.augment not in AUGMENT_MODES:
            raise UserError(f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}")
