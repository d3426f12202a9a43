"""The embedded default dataset: small generated chest-X-ray-like images.

Not medical data. Each image is a grayscale "radiograph": a bright torso, two
dark lung fields with rib shadows, a bright mediastinum and spine, film noise
and blur, with random size, aspect ratio, exposure and pose. Pneumonia cases
add opacities inside the lungs: one dense lobar consolidation for ``bacterial``
cases, several faint bilateral patches for ``viral`` ones. A small CNN learns
the difference in a few epochs.

The files are written in the Kaggle ``chest_xray`` layout with Kermany-style
names (``person12_bacteria_40.jpeg``, ``IM-0007-0001.jpeg``,
``NORMAL2-IM-0031-0002.jpeg``), several images per patient and no patient in
two splits, so every ingest rule has something to act on. Everything is
deterministic from the seed.

With ``planted_region=True`` every pneumonia image also carries a bright
square at a fixed place (:data:`PLANTED_BOX`, fractions of width and height):
a feature a model can learn, used to check that Grad-CAM finds it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# (split, class) -> number of images.
DEFAULT_COUNTS = {
    ("train", "normal"): 200, ("train", "pneumonia"): 520,
    ("val", "normal"): 8, ("val", "pneumonia"): 8,
    ("test", "normal"): 70, ("test", "pneumonia"): 110,
}
PLANTED_BOX = (0.62, 0.30, 0.80, 0.48)  # x0, y0, x1, y1 as fractions
GENERATOR_VERSION = 2


def _gaussian(xx, yy, cx, cy, sx, sy):
    return np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2) / 2)


def _blur(image: np.ndarray, passes: int = 2) -> np.ndarray:
    for _ in range(passes):
        image = (image + np.roll(image, 1, 0) + np.roll(image, -1, 0)
                 + np.roll(image, 1, 1) + np.roll(image, -1, 1)) / 5
    return image


def render(rng: np.random.Generator, subtype: str, width: int, height: int,
           planted_region: bool = False) -> np.ndarray:
    """One image as a [height, width] uint8 array; subtype none/bacterial/viral."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    tilt = rng.normal(0, 0.03)
    xx, yy = xx + tilt * (yy - 0.5), yy - tilt * (xx - 0.5)
    cx = 0.5 + rng.normal(0, 0.02)
    image = np.full((height, width), 15.0, np.float32)
    torso = (((xx - cx) / 0.46) ** 2 + ((yy - 0.58) / 0.55) ** 2) < 1
    image[torso] = 150 + rng.normal(0, 10)
    lung_w, lung_h = rng.uniform(0.13, 0.17), rng.uniform(0.28, 0.34)
    lungs = np.zeros_like(image)
    centres = []
    for side in (-1, 1):
        lx, ly = cx + side * rng.uniform(0.17, 0.2), 0.5 + rng.normal(0, 0.015)
        centres.append((lx, ly))
        lungs = np.maximum(lungs, (((xx - lx) / lung_w) ** 2 + ((yy - ly) / lung_h) ** 2) < 1)
    lungs = _blur(lungs.astype(np.float32), 3)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(7, 9) + 3 * (xx - cx) ** 2))
    image -= lungs * (95 + rng.normal(0, 8) - 18 * ribs)
    spine = np.exp(-((xx - cx) / 0.035) ** 2 / 2) * (yy > 0.12)
    image += 60 * spine
    heart = _gaussian(xx, yy, cx + 0.06, 0.66, 0.09, 0.08)
    image += 55 * heart * lungs
    if subtype == "bacterial":
        lx, ly = centres[rng.integers(2)]
        ox, oy = lx + rng.normal(0, 0.04), ly + rng.uniform(-0.05, 0.2)
        image += rng.uniform(90, 130) * _gaussian(xx, yy, ox, oy, rng.uniform(0.06, 0.09),
                                                  rng.uniform(0.08, 0.13)) * lungs
    elif subtype == "viral":
        for _ in range(rng.integers(6, 11)):
            lx, ly = centres[rng.integers(2)]
            ox, oy = lx + rng.normal(0, 0.06), ly + rng.normal(0, 0.12)
            image += rng.uniform(50, 75) * _gaussian(xx, yy, ox, oy, 0.04, 0.05) * lungs
    elif subtype != "none":
        raise ValueError(f"subtype must be none, bacterial or viral, got {subtype!r}")
    if planted_region and subtype != "none":
        x0, y0, x1, y1 = PLANTED_BOX
        box = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        image[box] = 235
    image = _blur(image, 2)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 6)
    image += rng.normal(0, 7, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _patients(rng, label: str, n_images: int, start: int):
    """Yields (file stem, subtype) for n_images, 1-3 images per patient."""
    made, person, image_no = 0, start, 1
    while made < n_images:
        per_patient = min(int(rng.integers(1, 4)), n_images - made)
        if label == "normal":
            series = "NORMAL2-IM" if rng.random() < 0.3 else "IM"
            for k in range(per_patient):
                yield f"{series}-{person:04d}-{k + 1:04d}", "none"
        else:
            subtype = "bacterial" if rng.random() < 0.65 else "viral"
            token = "bacteria" if subtype == "bacterial" else "virus"
            for _ in range(per_patient):
                yield f"person{person}_{token}_{image_no}", subtype
                image_no += 1
        made += per_patient
        person += 1


def generate_dataset(output_dir: str | os.PathLike, *, seed: int = 0,
                     counts: dict[tuple[str, str], int] | None = None,
                     size_range: tuple[int, int] = (200, 320),
                     planted_region: bool = False) -> Path:
    """Writes the dataset in the Kaggle layout under ``output_dir``; returns it."""
    output_dir = Path(output_dir)
    counts = DEFAULT_COUNTS if counts is None else counts
    rng = np.random.default_rng(seed)
    next_patient = {"normal": 1, "pneumonia": 1}
    for (split, label), n in counts.items():
        folder = output_dir / split / label.upper()
        folder.mkdir(parents=True, exist_ok=True)
        for stem, subtype in _patients(rng, label, n, next_patient[label]):
            width = int(rng.integers(*size_range))
            height = int(width * rng.uniform(0.8, 1.0))
            pixels = render(rng, subtype, width, height, planted_region)
            Image.fromarray(pixels, "L").save(folder / f"{stem}.jpeg", quality=92)
        next_patient[label] += n + 1
    return output_dir


def cache_root() -> Path:
    return Path(os.environ.get("PNEUMO_CACHE", Path.home() / ".cache" / "pneumo"))


def default_dataset_dir(seed: int = 0) -> Path:
    """The embedded default dataset, generated once into the cache (atomically)."""
    target = cache_root() / f"synthetic-v{GENERATOR_VERSION}-seed{seed}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            generate_dataset(staging, seed=seed)
            os.replace(staging, target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
