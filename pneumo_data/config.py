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
RESIDENCY_MODES = ("stream", "device", "auto")


# The issue-10 research's intensity ranges (on by default; the seed recipe turns them off).
INTENSITY_DEFAULTS = {"gamma": 0.5, "contrast": 0.4, "brightness_levels": 25.0,
                      "blur_sigma": 0.01, "blur_probability": 0.3, "noise_levels": 6.0}
INTENSITY_FIELDS = tuple(INTENSITY_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges, units explicit. The defaults are the default recipe's (issue 10:
    the old ImageDataGenerator affine ranges with zoom 0.25, plus intensity transforms);
    :meth:`seed_recipe` is exactly the old call (``rotation_range=15, width_shift_range=0.1,
    height_shift_range=0.1, shear_range=0.1, zoom_range=0.1, horizontal_flip=True``) with no
    intensity transform. Grey levels are on the 0..255 scale of the uint8 images."""

    rotation_deg: float = option(15.0, "Rotation drawn from U(-r, r), in degrees.")
    width_shift: float = option(0.1, "Horizontal shift from U(-w, w), a fraction of the width.")
    height_shift: float = option(0.1, "Vertical shift from U(-h, h), a fraction of the height.")
    shear_deg: float = option(0.1, "Shear angle from U(-s, s), in degrees (ImageDataGenerator's "
                                   "shear_range is degrees too).")
    zoom: float = option(0.25, "x and y sampling scales drawn independently from U(1-z, 1+z) "
                               "(training job: 0.25 for bn_cnn, 0.1 for the other networks "
                               "unless given).")
    horizontal_flip: bool = option(True, "Mirror left-right with probability 1/2.")
    gamma: float = option(INTENSITY_DEFAULTS["gamma"],
                          "Gamma g drawn log-uniformly from [1/(1+G), 1+G]: x -> 255 (x/255)^g "
                          "(0: off).")
    contrast: float = option(INTENSITY_DEFAULTS["contrast"],
                             "Contrast factor c drawn log-uniformly from [1/(1+C), 1+C], about "
                             "each image's mean grey level: m + c (x - m) (0: off).")
    brightness_levels: float = option(INTENSITY_DEFAULTS["brightness_levels"],
                                      "Brightness offset drawn from U(-b, b), in grey levels "
                                      "(0: off).")
    blur_sigma: float = option(INTENSITY_DEFAULTS["blur_sigma"],
                               "Gaussian blur sigma drawn from U(0, s), a fraction of the image's "
                               "shorter side (0.01 = 1.5 px at 150 px; 0: off).")
    blur_probability: float = option(INTENSITY_DEFAULTS["blur_probability"],
                                     "Probability that an image is blurred (0: off).")
    noise_levels: float = option(INTENSITY_DEFAULTS["noise_levels"],
                                 "Gaussian noise whose standard deviation is drawn per image "
                                 "from U(0, n), in grey levels (0: off).")

    def __post_init__(self):
        for name in ("rotation_deg", "width_shift", "height_shift", "shear_deg", "zoom",
                     *INTENSITY_FIELDS):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.zoom >= 1:
            raise UserError(f"zoom must be below 1 (scale 1-zoom must stay positive), got "
                             f"{self.zoom}")
        if self.shear_deg >= 90 or self.rotation_deg > 180:
            raise UserError("shear_deg must be below 90 and rotation_deg at most 180")
        if self.blur_probability > 1:
            raise UserError(f"blur_probability must be at most 1, got {self.blur_probability}")
        if self.blur_sigma > 0.25:
            raise UserError(f"blur_sigma is a fraction of the image side; at most 0.25, got "
                             f"{self.blur_sigma}")
        if self.brightness_levels > 255 or self.noise_levels > 255:
            raise UserError("brightness_levels and noise_levels are grey levels (at most 255)")

    @property
    def affine_is_identity(self) -> bool:
        return not (self.rotation_deg or self.width_shift or self.height_shift
                    or self.shear_deg or self.zoom or self.horizontal_flip)

    @property
    def blurs(self) -> bool:
        return bool(self.blur_sigma and self.blur_probability)

    @property
    def intensity_is_identity(self) -> bool:
        return not (self.gamma or self.contrast or self.brightness_levels or self.blurs
                    or self.noise_levels)

    @property
    def is_identity(self) -> bool:
        return self.affine_is_identity and self.intensity_is_identity

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, False, **dict.fromkeys(INTENSITY_FIELDS, 0.0))

    @classmethod
    def seed_recipe(cls) -> "AugmentConfig":
        """The old ImageDataGenerator call exactly: affine only, zoom 0.1."""
        return cls(zoom=0.1, **dict.fromkeys(INTENSITY_FIELDS, 0.0))

    def without_intensity(self) -> "AugmentConfig":
        return dataclasses.replace(self, **dict.fromkeys(INTENSITY_FIELDS, 0.0))


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
    residency: str = option(
        "stream", "Where the train split lives while training: stream (tf.data from the "
                  "shards), device (placed once in accelerator memory, batches drawn there; "
                  "falls back to the stream with a one-line reason when it does not fit) or "
                  "auto (device only on a GPU reporting enough free memory).",
        choices=RESIDENCY_MODES)
    residency_budget_mb: float = option(
        0.0, "Memory per device the resident set may use, in MB, instead of what the devices "
             "report (0: half of the free memory they report).")
    augmentation: AugmentConfig = group(AugmentConfig, "Augmentation ranges.")

    def validate(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise UserError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.augment not in AUGMENT_MODES:
            raise UserError(f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}")
        if self.residency not in RESIDENCY_MODES:
            raise UserError(f"residency must be one of {RESIDENCY_MODES}, got "
                            f"{self.residency!r}")
        if not (self.residency_budget_mb >= 0 and math.isfinite(self.residency_budget_mb)):
            raise UserError(f"residency_budget_mb must be >= 0, got "
                            f"{self.residency_budget_mb!r}")
