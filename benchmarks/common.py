"""Shared benchmark plumbing: environment facts, repeated timing, JSON + Markdown output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pneumo_data import sources, synthetic
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import replacing, write_text
from pneumo_data.prepare import PrepareConfig, prepare

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = RESULTS_DIR.parents[1]  # the checkout; its parent holds the workplace's shared data

# The old recipe's ImageDataGenerator augmentation (shear_range is in degrees there).
OLD_AUGMENTATION = dict(rotation_range=15, width_shift_range=0.1, height_shift_range=0.1,
                        shear_range=0.1, zoom_range=0.1, horizontal_flip=True,
                        fill_mode="nearest")


def five_keras_cv_layers():
    """The seed's augmentation as five keras-cv layers (what issue 21's ratios are to)."""
    import keras_cv
    return [
        keras_cv.layers.RandomRotation(15 / 360, fill_mode="nearest"),
        keras_cv.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
        keras_cv.layers.RandomShear(x_factor=0.1, y_factor=0.1, fill_mode="nearest"),
        keras_cv.layers.RandomZoom(0.1, 0.1, fill_mode="nearest"),
        keras_cv.layers.RandomFlip("horizontal"),
    ]


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` as the jobs run: a :class:`UserError` (a missing folder, a result
    file that is not ours) is one line on stderr and exit status 1, not a traceback."""
    from absl import app

    name = Path(sys.argv[0]).stem

    def guarded(argv):
        try:
            return main(argv)
        except UserError as error:
            print(f"benchmarks.{name}: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    app.run(guarded)


def source_dir(flag: str | None) -> str:
    """``--source_dir``, or the embedded dataset when it is not given; a folder that does not
    exist is refused here, before TensorFlow loads."""
    if flag is None:
        return str(synthetic.default_dataset_dir())
    if not Path(flag).is_dir():
        raise UserError(f"--source_dir {flag} does not exist or is not a folder")
    return flag


def class_root(source_dir: str) -> str:
    """The folder whose children are NORMAL/PNEUMONIA (train split if there is one)."""
    layout = sources.detect_layout(Path(source_dir))
    folders = layout.get("train") or layout.get(None) or next(iter(layout.values()))
    return str(next(iter(folders.values())).parent)


@contextlib.contextmanager
def prepared_train_folder(source_dir: str, prefix: str):
    """Prepares the folder the old recipe reads (the class folders under ``train``,
    every image in pneumo's train split) into a temporary data_dir.

    Yields (data_dir, manifest, prepare seconds); the folder is removed afterwards.
    """
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        start = time.perf_counter()
        m = prepare(PrepareConfig(source_dir=class_root(source_dir), output_dir=work,
                                  progress=False, val_fraction=0.0, test_fraction=0.0,
                                  resplit="all"))
        yield work, m, time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


def define_common_flags() -> None:
    """The flags every model-facing benchmark shares (data, sizes, outputs)."""
    from absl import flags
    flags.DEFINE_string("source_dir", None, "Image folder (default: the embedded dataset).")
    flags.DEFINE_integer("image_size", 150, "Model input size.")
    flags.DEFINE_integer("batch_size", 32, "Batch size.")
    flags.DEFINE_bool("plot", False, "Also write a bar chart PNG.")
    flags.DEFINE_string("output_dir", None, "Results folder (default benchmarks/results).")
    flags.DEFINE_string("name", None, "Result file name (default from the source folder).")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector and matrix extensions of this CPU that decide TensorFlow's kernels (avx2,
    avx512*, amx*), from /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return []


def machine_line() -> str:
    """``CPU model, N cores, flags`` in one line, for every result table."""
    flags = cpu_flags()
    listed = ", ".join(flags) if flags else "no flags read"
    no_512 = "" if any(f.startswith("avx512") for f in flags) else ", no AVX-512"
    no_amx = "" if any(f.startswith("amx") for f in flags) else ", no AMX"
    return f"{cpu_model()}, {os.cpu_count()} cores ({listed}{no_512}{no_amx})"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("?" where unreadable)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def environment() -> dict[str, Any]:
    """Device, versions, CPU and GPU facts recorded with every result."""
    import keras
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        gpu_names.append(details.get("device_name", gpu.name))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "load_average": load_average(),
        "device": "GPU" if gpus else "CPU",
        "gpus": gpu_names,
    }


def gpu_memory() -> dict[str, int] | None:
    """Current and peak memory of the first GPU in bytes (since the last reset), or None."""
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")


def reset_gpu_peak() -> None:
    """Starts a new peak-memory window on the first GPU (no-op on a CPU)."""
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def repeat_timing(run: Callable[[], int], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Runs ``run`` (which returns a count of items) warmup + repeats times.

    Returns items/s as median, min and max over the timed repeats.
    """
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        items = run()
        rates.append(items / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": repeats}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SOFTWARE_TAG = "pneumo benchmarks"


def _ours(path: Path) -> bool:
    """True when ``path`` is a result file a pneumo benchmark wrote (or does not exist)."""
    if not path.exists():
        return True
    if path.suffix == ".json":
        try:
            return "environment" in json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, TypeError):
            return False
    if path.suffix == ".md":
        return path.read_text(errors="replace").startswith("`")
    if path.suffix == ".png":
        from PIL import Image
        try:
            with Image.open(path) as image:
                return image.info.get("Software") == SOFTWARE_TAG
        except OSError:
            return False
    return False


def check_writable(*paths: Path) -> None:
    """Refuses (before any measuring) to replace files that are not benchmark results."""
    for path in paths:
        if path.is_dir() or not _ours(path):
            raise UserError(f"{path} exists and was not written by a pneumo benchmark; not "
                            f"replacing it. Choose another --output_dir or --name")


def result_paths(name: str, output_dir: str | None, plot: bool = False) -> list[Path]:
    out = Path(output_dir) if output_dir else RESULTS_DIR
    return [out / f"{name}{suffix}" for suffix in (".json", ".md", ".png")[:3 if plot else 2]]


def portable_path(value: str) -> str:
    """An absolute path inside the checkout or the workplace's ``shared/`` folder beside it, as
    the path relative to the checkout (``../shared/data/...``), which reads the same on every
    machine; any other string unchanged."""
    if not os.path.isabs(value):
        return value
    path = Path(os.path.normpath(value))
    roots = (REPO.resolve(), (REPO.parent / "shared").resolve())
    try:
        resolved = path.resolve()
    except OSError:
        return value
    if not any(resolved == root or root in resolved.parents for root in roots):
        return value
    return os.path.relpath(resolved, roots[0])


def portable(payload: Any) -> Any:
    """``payload`` with every string that is such a path made :func:`portable_path`."""
    if isinstance(payload, dict):
        return {k: portable(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [portable(v) for v in payload]
    return portable_path(payload) if isinstance(payload, str) else payload


def _path_strings(payload: Any) -> set[str]:
    if isinstance(payload, dict):
        return set().union(*map(_path_strings, payload.values()), set())
    if isinstance(payload, (list, tuple)):
        return set().union(*map(_path_strings, payload), set())
    return {payload} if isinstance(payload, str) and portable_path(payload) != payload else set()


def write_results(name: str, output_dir: str | None, payload: dict[str, Any],
                  table: str) -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` (atomically) and prints the table. Paths into
    the checkout or the shared data beside it are written relative to the checkout
    (:func:`portable`), so a committed result holds no machine's folder names."""
    out = Path(output_dir) if output_dir else RESULTS_DIR
    check_writable(*result_paths(name, output_dir))
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(_path_strings(payload), key=len, reverse=True):
        table = table.replace(path, portable_path(path))
    payload = portable(payload)
    env = payload.get("environment", {})
    gpus = ", " + ", ".join(env["gpus"]) if env.get("gpus") else ""
    header = (f"`{name}` on {env.get('device', '?')} ({env.get('cpu', '?')}, "
              f"{env.get('cores', '?')} cores{gpus}), TF {env.get('tensorflow', '?')}, "
              f"Keras {env.get('keras', '?')}, {env.get('date', '?')}")
    for suffix, text in ((".json", json.dumps(payload, indent=1) + "\n"),
                         (".md", header + "\n\n" + table + "\n")):
        write_text(out / f"{name}{suffix}", text)
    print(header + "\n\n" + table, flush=True)
    return out / f"{name}.json"


def bar_chart(path: Path, values: dict[str, float], unit: str, title: str) -> Path:
    """Horizontal bar chart PNG of ``values`` (label -> number), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(values)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.5))
    bars = ax.barh(range(len(labels)), [values[k] for k in labels], color="#4477aa")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(unit + " (log scale)")
    ax.set_title(title, fontsize=10)
    for bar, label in zip(bars, labels):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {values[label]:,.0f}",
                va="center", fontsize=8)
    fig.tight_layout()
    check_writable(Path(path))
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": SOFTWARE_TAG})
    plt.close(fig)
    return Path(path)


def window_rates(stamps: list[float], warmup: int, steps: int, repeats: int,
                 batch: int) -> dict[str, float]:
    """images/s over ``repeats`` windows of ``steps`` steps after ``warmup`` steps;
    ``stamps[i]`` is the time after step i+1. Median, min and max."""
    import statistics
    rates = []
    for r in range(repeats):
        start = stamps[warmup - 1 + r * steps]
        end = stamps[warmup - 1 + (r + 1) * steps]
        rates.append(steps * batch / (end - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
