"""Shared fixtures: small generated image folders, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

# The real X-rays sit beside the checkout (../shared/data); PNEUMO_SHARED_DATA points
# elsewhere (a git worktree, a CI cache).
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def write_image(path: Path, value: int = 128, size=(40, 32), mode="L", fmt=None, seed=0):
    """A small random-ish image around ``value``; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(value, 20, size[::-1]), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L")
    if mode != "L":
        image = image.convert(mode)
    image.save(path, fmt)
    return path


def make_kaggle_tree(root: Path, layout: dict[str, dict[str, list[str]]], seed=0) -> Path:
    """Writes ``{split: {CLASS: [file names]}}`` as distinct small JPEG/PNG images."""
    k = seed
    for split, classes in layout.items():
        for cls, names in classes.items():
            for name in names:
                k += 1
                value = 70 if cls.lower() == "normal" else 180
                write_image(root / split / cls / name, value=value, seed=k)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real chest X-rays not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """A small generated dataset in the Kaggle layout (same generator as the default)."""
    from pneumo_data.synthetic import generate_dataset
    counts = {("train", "normal"): 40, ("train", "pneumonia"): 90,
              ("val", "normal"): 4, ("val", "pneumonia"): 4,
              ("test", "normal"): 16, ("test", "pneumonia"): 24}
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), seed=3, counts=counts,
                            size_range=(96, 128))


@pytest.fixture(scope="session")
def prepared(synthetic_source, tmp_path_factory) -> Path:
    """``synthetic_source`` prepared at 64 px: a small data_dir for pipeline tests."""
    from pneumo_data.prepare import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig(source_dir=str(synthetic_source), output_dir=str(out),
                          image_size=64, progress=False))
    return out


@pytest.fixture(scope="session")
def trained_model_dir(prepared, tmp_path_factory) -> Path:
    """A tiny finished training run on ``prepared`` (32 px manual CNN, 2 steps). Do not
    change it: take a :func:`copy_model_dir` of it."""
    from pneumo_data.common.config import with_leaves
    from pneumo_models.train import TrainConfig, train
    out = tmp_path_factory.mktemp("trained") / "run"
    train(with_leaves(TrainConfig(), data_dir=str(prepared), model_dir=str(out), image_size=32,
                      batch_size=8, epochs=1, steps_per_epoch=2, precision="float32",
                      early_stopping_patience=0))
    return out


def copy_model_dir(source: Path, tmp_path_factory) -> Path:
    """A copy of a model_dir at the same depth under the test folder, so its run.json's
    relative data_dir still points at the same prepared data."""
    import shutil
    target = tmp_path_factory.mktemp("copy") / source.name
    shutil.copytree(source, target)
    assert target.parent.parent == source.parent.parent
    return target


@pytest.fixture(scope="session")
def prepared_many_shards(synthetic_source, tmp_path_factory) -> Path:
    """``synthetic_source`` at 32 px in shards of about 5 images: several files per class, as
    multi-worker input pipelines and tf.data service workers need."""
    from pneumo_data.prepare import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("prepared_many_shards")
    prepare(PrepareConfig(source_dir=str(synthetic_source), output_dir=str(out),
                          image_size=32, progress=False, shard_mb=0.005))
    return out


def free_port() -> int:
    """A TCP port that was free a moment ago (for servers started right after)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]
