r"""A 3x3 grid of augmented versions of one X-ray, as the old recipe's figure showed.

    python -m pneumo_data.visualize --image=chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg \
        --output=augmented.png
    python -m pneumo_data.visualize --output=augmented.png   # an embedded default image
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from pneumo_data import synthetic
from pneumo_data.common.config import group, option
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import replacing
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.config import AugmentConfig
from pneumo_data.preprocess import DecodeError, PreprocessSpec, decode

SOFTWARE_TAG = "pneumo_data.visualize"


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
    image: str | None = option(None, "Image file (default: one from the embedded dataset).")
    output: str = option("augmented.png", "PNG to write (an existing file is replaced only if "
                                          "this job wrote it).")
    image_size: int = option(150, "Side of the square image.")
    seed: int = option(0, "Seed of the random draws.")
    augmentation: AugmentConfig = group(AugmentConfig)


def augmented_grid(pixels: np.ndarray, params: AugmentConfig, seed: int) -> np.ndarray:
    """Nine augmented copies [9, H, W] uint8 of one [H, W] uint8 image (first: original)."""
    tf = import_tensorflow()  # the job's TensorFlow half: the one place it loads
    from pneumo_data.augment import augment_batch
    batch = tf.constant(np.repeat(pixels[None, :, :, None], 9, axis=0))
    out = augment_batch(batch, params, tf.constant([seed, 0], tf.int64)).numpy()[..., 0]
    out[0] = pixels
    return out


def write_grid(images: np.ndarray, output: str | os.PathLike, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 8))
    for k, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title("original" if k == 0 else f"augmented {k}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with replacing(output) as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": SOFTWARE_TAG})
    plt.close(fig)
    return Path(output)


def _written_here(path: Path) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.info.get("Software") == SOFTWARE_TAG
    except OSError:
        return False


def visualize(config: VisualizeConfig) -> Path:
    """Writes the grid; returns its path."""
    output = Path(config.output)
    if output.is_dir() or (output.exists() and not _written_here(output)):
        raise UserError(f"--output {output} exists and was not written by this job; not "
                        f"replacing it. Choose another --output")
    path = config.image
    if path is None:
        folder = synthetic.default_dataset_dir() / "train" / "PNEUMONIA"
        path = next(iter(sorted(folder.iterdir())))
    try:
        pixels = decode(path, PreprocessSpec(stored_size=config.image_size)).pixels
    except (OSError, DecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    params = config.augmentation
    title = (f"{Path(path).name}: rotation ±{params.rotation_deg}°, shear ±{params.shear_deg}°, "
             f"shift ±{params.width_shift:.0%}/±{params.height_shift:.0%}, "
             f"zoom ±{params.zoom:.0%}, flip={params.horizontal_flip}"
             + ("" if params.intensity_is_identity else
                f"\ngamma ±{params.gamma}, contrast ±{params.contrast}, brightness "
                f"±{params.brightness_levels:g} levels, blur σ≤{params.blur_sigma:g}·side "
                f"(p {params.blur_probability:g}), noise σ≤{params.noise_levels:g} levels"))
    out = write_grid(augmented_grid(pixels, params, config.seed), output, title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("visualize", VisualizeConfig, visualize)
