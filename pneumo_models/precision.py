"""Precision and XLA choices per device, decided once and recorded with the run.

``auto`` precision: ``mixed_float16`` on a CUDA GPU with compute capability
7.0 or newer (tensor cores), ``mixed_bfloat16`` on a CPU whose flags show AMX
or AVX512-BF16 (oneDNN then runs bf16 matmuls natively), else ``float32``.
``auto`` XLA: on for GPUs, off for CPUs (on the 2-core development machine XLA
was slower in every case measured).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras
import tensorflow as tf

from pneumo_models.config import JIT_CHOICES, PRECISIONS


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    result = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        result.append(tuple(details.get("compute_capability", (0, 0))))
    return result


def resolve_precision(precision: str, *, gpus: list[tuple[int, int]] | None = None,
                      flags: set[str] | None = None) -> str:
    """The Keras dtype policy name for ``precision`` on this machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    gpus = gpu_compute_capabilities() if gpus is None else gpus
    if gpus:
        return "mixed_float16" if min(gpus) >= (7, 0) else "float32"
    return "mixed_bfloat16" if cpu_has_fast_bf16(flags) else "float32"


def resolve_jit(jit_compile: str | bool, *, has_gpu: bool | None = None) -> bool:
    if isinstance(jit_compile, bool):
        return jit_compile
    if jit_compile not in JIT_CHOICES:
        raise ValueError(f"jit_compile must be one of {JIT_CHOICES}, got {jit_compile!r}")
    if jit_compile != "auto":
        return jit_compile == "true"
    if has_gpu is None:
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    return has_gpu


@contextlib.contextmanager
def dtype_policy(name: str):
    """Sets the global Keras dtype policy for building, then restores the old one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
