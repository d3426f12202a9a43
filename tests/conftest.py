"""Shared fixtures (small generated image folders, a tiny trained run, the real data when
present) and the test tiers.

Tiers: ``python -m pytest -m "not slow"`` is the inner loop (at most about two minutes on two
cores); the whole suite is CI's. A test that trains, starts a subprocess or a server is slow:
tests that use such a fixture (:data:`TRAINING_FIXTURES`) are marked slow here, the
others carry ``@pytest.mark.slow`` themselves, and a test of the fast tier that starts a Python
process fails with a message saying so. Shared helpers live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# Fixtures that train a model or start servers: every test using one is in the slow tier.
TRAINING_FIXTURES = frozenset({"trained_model_dir", "model_dirs", "trained", "cluster"})

# The real X-rays sit beside the checkout (../shared/data); PNEUMO_SHARED_DATA points
# elsewhere (a git worktree, a CI cache).
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# The longest files first (seconds on 2 cores): CI runs the suite on two workers, one file at
# a time each (.ci/run), and a long file started last would leave one worker idle at the end.
LONGEST_FIRST = ("test_benchmarks.py", "test_train.py", "test_train_distributed.py",
                 "test_train_resume.py", "test_service.py", "test_train_resident.py",
                 "test_model_identity.py", "test_prepare.py", "test_models.py")


def _file_rank(item) -> int:
    name = Path(str(item.fspath)).name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: each file's tests keep their order
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) \
                or item.get_closest_marker("beam"):  # Beam starts worker processes
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier, starting a Python process (a job, a snippet, a server) is an error
    that names the test to mark slow."""
    if request.node.get_closest_marker("slow"):
        return
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        first = args[0] if isinstance(args, (list, tuple)) and args else args
        if str(first) == sys.executable:
            pytest.fail(f"{request.node.nodeid} starts a Python process: mark it "
                        f"@pytest.mark.slow (tests/conftest.py)", pytrace=False)
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


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


@pytest.fixture(scope="session")
def prepared_many_shards(synthetic_source, tmp_path_factory) -> Path:
    """``synthetic_source`` at 32 px in shards of about 5 images: several files per class, as
    multi-worker input pipelines and tf.data service workers need."""
    from pneumo_data.prepare import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("prepared_many_shards")
    prepare(PrepareConfig(source_dir=str(synthetic_source), output_dir=str(out),
                          image_size=32, progress=False, shard_mb=0.005))
    return out
