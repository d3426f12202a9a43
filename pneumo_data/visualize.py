r"""A 3x3 grid of augmented versions of one X-ray, as the old recipe's figure showed.

    python -m pneumo_data.visualize --image=chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg \
        --output=augmented.png
    python -m pneumo_data.visualize --output=augmented.png   # an embedded default image
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import app, flags

from pneumo_data import decode
from pneumo_data.atomic import replacing
from pneumo_data.augment import AffineParams

flags.DEFINE_string("image", None, "Image file (default: one from the embedded dataset).")
flags.DEFINE_string("output", "augmented.png", "PNG to write.")
flags.DEFINE_integer("image_size", 150, "Side of the square image.")
flags.DEFINE_integer("seed", 0, "Seed of the random draws.")
flags.DEFINE_float("rotation_deg", AffineParams.rotation_deg, "Rotation range, degrees.")
flags.DEFINE_float("shear_deg", AffineParams.shear_deg, "Shear range, degrees.")
flags.DEFINE_float("width_shift", AffineParams.width_shift, "Shift range, fraction of width.")
flags.DEFINE_float("height_shift", AffineParams.height_shift, "Shift range, fraction of height.")
flags.DEFINE_float("zoom", AffineParams.zoom, "Zoom range: scale in [1-zoom, 1+zoom].")
flags.DEFINE_bool("horizontal_flip", True, "Random left-right mirror.")
FLAGS = flags.FLAGS


def augmented_grid(pixels: np.ndarray, params: AffineParams, seed: int) -> np.ndarray:
    """Nine augmented copies [9, H, W] uint8 of one [H, W] uint8 image (first: original)."""
    import tensorflow as tf
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
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(output)


def main(argv):
    del argv
    path = FLAGS.image
    if path is None:
        from pneumo_data import synthetic
        path = next(iter(sorted((synthetic.default_dataset_dir() / "train" / "PNEUMONIA").iterdir())))
    try:
        pixels = decode.decode_to_gray(Path(path).read_bytes(), FLAGS.image_size)
    except (OSError, decode.DecodeError) as error:
        raise SystemExit(f"visualize: cannot read {path}: {error}") from None
    params = AffineParams(FLAGS.rotation_deg, FLAGS.width_shift, FLAGS.height_shift,
                          FLAGS.shear_deg, FLAGS.zoom, FLAGS.horizontal_flip)
    title = (f"{Path(path).name}: rotation ±{params.rotation_deg}°, shear ±{params.shear_deg}°, "
             f"shift ±{params.width_shift:.0%}/±{params.height_shift:.0%}, "
             f"zoom ±{params.zoom:.0%}, flip={params.horizontal_flip}")
    out = write_grid(augmented_grid(pixels, params, FLAGS.seed), FLAGS.output, title)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
