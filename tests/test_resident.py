"""The device-resident training set: memory check and fallback, balance and epoch accounting,
seeds, resume, and (in a subprocess with two logical CPU devices) MirroredStrategy."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumo_data import reader, resident
from pneumo_data.config import PipelineConfig

ROOT = Path(__file__).parents[1]


def config(batch=8, augment="device", **kw):
    return PipelineConfig(batch_size=batch, image_size=16, augment=augment,
                          residency="device", **kw)


def test_memory_check_reasons():
    assert resident.memory_check(10, ["/cpu:0"], host_available=lambda: 10 ** 9) is None
    reason = resident.memory_check(10 ** 9, ["/cpu:0"], host_available=lambda: 10 ** 9)
    assert "host" in reason and "MB" in reason and "\n" not in reason
    gpu = resident.memory_check(10 ** 6, ["/job:localhost/device:GPU:0"],
                                host_available=lambda: 10 ** 10, gpu_free=lambda i: None)
    assert "cannot tell the free memory" in gpu
    assert resident.memory_check(10 ** 6, ["/device:GPU:0"], host_available=lambda: 10 ** 10,
                                 gpu_free=lambda i: 10 ** 9) is None
    assert "budget" in resident.memory_check(10 ** 6, ["/cpu:0"], budget_bytes=10 ** 5,
                                             host_available=lambda: 10 ** 10)


def test_auto_places_only_on_gpus():
    assert "GPUs only" in resident.auto_refusal(["/cpu:0"], None)
    assert "GPUs only" in resident.auto_refusal(["/device:GPU:0", "/device:CPU:0"], None)
    assert resident.auto_refusal(["/device:GPU:0", "/device:GPU:1"], None) is None


def test_refusal_falls_back_to_the_stream_with_a_reason(prepared):
    tiny = config(residency_budget_mb=1e-4)
    source, reason = reader.resident_or_stream(prepared, tiny, seed=0)
    assert isinstance(source, tf.data.Dataset) and "budget" in reason and "\n" not in reason
    x, y = next(iter(source))
    assert x.dtype == tf.uint8 and x.shape == (8, 16, 16, 1)


@pytest.mark.slow
def test_resident_batches_balance_and_walk_each_class_once_per_pass(prepared):
    source, reason = reader.resident_or_stream(prepared, config(), seed=1,
                                                 deterministic=True)
    assert reason is None
    step = tf.function(source.next_batch)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in (step() for _ in range(80))])
    images, labels = np.concatenate(images), np.concatenate(labels)[:, 0]
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 1)
    assert abs(labels.mean() - 0.5) < 0.08
    counts = source.sampler.counts
    for label, n in enumerate(counts):
        mine = [img.tobytes() for img, lab in zip(images, labels) if lab == label]
        blocks = [mine[k * n:(k + 1) * n] for k in range(len(mine) // n)]
        assert len(blocks) >= 2
        assert all(len(set(b)) == n for b in blocks) and len(set(mine)) == n
    # the same seed gives the same batches
    again, _ = reader.resident_or_stream(prepared, config(), seed=1, deterministic=True)
    np.testing.assert_array_equal(tf.function(again.next_batch)()[0].numpy(), images[:8])


@pytest.mark.slow
def test_restore_continues_the_walk_exactly(prepared):
    """A set restored from checkpoint_state() after k steps draws what the original draws
    next, also in the middle of a chunk of draws."""
    a = resident.resident_train_set(prepared, config(), seed=2)
    step_a = tf.function(a.next_batch)
    for k in (5, 16, 21):
        while int(a.step.numpy()) < k:
            step_a()
        saved = json.loads(json.dumps(a.checkpoint_state()))
        b = resident.resident_train_set(prepared, config(), seed=2)
        b.restore(saved)
        step_b = tf.function(b.next_batch)
        for _ in range(20):
            (xa, ya), (xb, yb) = step_a(), step_b()
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    with pytest.raises(ValueError, match="another set or seed"):
        resident.resident_train_set(prepared, config(), seed=3).restore(saved)


@pytest.mark.slow
def test_resident_host_augmentation_runs_there(prepared):
    source, _ = reader.resident_or_stream(prepared, config(augment="host"), seed=2)
    x, y = tf.function(source.next_batch)()
    assert x.dtype == tf.uint8 and x.shape == (8, 16, 16, 1)


def test_several_workers_and_auto_on_cpu_are_refused_before_reading(prepared):
    auto = dataclasses.replace(config(), residency="auto")
    with pytest.raises(resident.ResidentRefused, match="GPUs only"):
        resident.resident_train_set(prepared, auto, seed=0)


TWO_REPLICAS = """
import json, os, sys
os.environ["PNEUMO_CPU_DEVICES"] = "2"
from pneumo_models import distribute
strategy = distribute.make_strategy("mirrored")
import numpy as np
import tensorflow as tf
from pneumo_data import reader, resident
from pneumo_data.config import PipelineConfig
cfg = PipelineConfig(batch_size=8, image_size=16, augment="device", residency="device")
source, reason = reader.resident_or_stream(sys.argv[1], cfg, seed=3, strategy=strategy,
                                             deterministic=True)
@tf.function
def step():
    return strategy.run(source.next_batch)
per_step = []
for _ in range(6):
    x, y = step()
    parts = [v.numpy() for v in strategy.experimental_local_results(x)]
    per_step.append([[p.tobytes() for p in part] for part in parts])
steps = [v.numpy().tolist() for v in strategy.experimental_local_results(source.step)]
saved = source.checkpoint_state()
again, _ = reader.resident_or_stream(sys.argv[1], cfg, seed=3, strategy=strategy)
again.restore(saved)
x1, _ = step()
x2, _ = tf.function(lambda: strategy.run(again.next_batch))()
print(json.dumps({"reason": reason, "replicas": strategy.num_replicas_in_sync,
                  "shapes": [len(p) for p in per_step[0]],
                  "disjoint": all(not (set(a) & set(b)) for a, b in per_step),
                  "steps": steps,
                  "restored_same": all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(
                      strategy.experimental_local_results(x1),
                      strategy.experimental_local_results(x2)))}))
"""


@pytest.mark.slow
def test_mirrored_replicas_draw_disjoint_halves_of_one_global_batch(prepared):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(TWO_REPLICAS), str(prepared)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reason"] is None and result["replicas"] == 2
    assert result["shapes"] == [4, 4] and result["disjoint"]
    assert result["steps"] == [6, 6]  # each replica's counters advanced in step
    assert result["restored_same"]
