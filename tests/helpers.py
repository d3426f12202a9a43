"""What many test modules need: the checkout, a job's environment, running a job or a Python
snippet in its own process, a free port, a copy of a model_dir, small generated images.

Everything here that starts a process belongs to the slow tier: a test calling it must be
marked ``@pytest.mark.slow`` (conftest.py refuses a Python subprocess in the fast tier).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# A job in a subprocess imports this checkout (not another installed copy), quietly.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
       "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


# First on PYTHONPATH, a ``tensorflow`` package whose import fails (see its docstring).
NO_TENSORFLOW = ROOT / "tests" / "no_tensorflow"


def job_env(env: dict | None = None, tensorflow: bool = True) -> dict:
    """:data:`ENV` with ``env`` on top; a value of None removes the variable (e.g.
    ``{"TF_CPP_MIN_LOG_LEVEL": None}`` for a test of what a user sees by default).
    ``tensorflow=False``: importing TensorFlow fails (:data:`NO_TENSORFLOW`)."""
    merged = {**ENV, **(env or {})}
    if not tensorflow:
        merged["PYTHONPATH"] = os.pathsep.join([str(NO_TENSORFLOW), merged["PYTHONPATH"]])
    return {k: v for k, v in merged.items() if v is not None}


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None,
               cwd: Path = ROOT, tensorflow: bool = True) -> subprocess.CompletedProcess:
    """``python -m module args`` in its own process: its exit status and its text output.
    ``tensorflow=False`` for a job that must finish (or refuse) without loading TensorFlow."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env=job_env(env, tensorflow), capture_output=True, text=True,
                          timeout=timeout)


def run_code(code: str, *args: str, timeout: float = 600, env: dict | None = None,
             cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -c code args`` in its own process."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=job_env(env),
                          capture_output=True, text=True, timeout=timeout)


def start_module(module: str, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``python -u -m module args`` started in the background (stdout and stderr piped)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-u", "-m", module, *args], cwd=ROOT,
                            env=job_env(env), text=True, **popen)


def read_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The next line ``proc`` prints on stdout, waiting at most ``timeout`` seconds (a server
    that never says it is ready fails the test instead of hanging it)."""
    import concurrent.futures
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(proc.stdout.readline).result(timeout)
    except concurrent.futures.TimeoutError:
        proc.kill()  # ends the readline too
        raise AssertionError(f"{proc.args} printed nothing within {timeout} s") from None
    finally:
        pool.shutdown(wait=False)


def free_port() -> int:
    """A TCP port that was free a moment ago (for servers started right after)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def copy_model_dir(source: Path, tmp_path_factory) -> Path:
    """A copy of a model_dir at the same depth under the test folder, so its run.json's
    relative data_dir still points at the same prepared data."""
    target = tmp_path_factory.mktemp("copy") / source.name
    shutil.copytree(source, target)
    assert target.parent.parent == source.parent.parent
    return target


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
