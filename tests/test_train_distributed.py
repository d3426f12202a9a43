"""The training job on several replicas, through its command line.

* MirroredStrategy over two logical CPU devices (``PNEUMO_CPU_DEVICES=2``) against one
  device: the same global batch gives the same training within rounding, and the replicas
  hold identical weights.
* Two MultiWorkerMirroredStrategy workers on localhost (``TF_CONFIG``, free ports): one
  killed after an epoch (the chief stops with a clear error), both restarted (the second
  worker on a "fresh machine", its scratch folder gone), completed, started again (a
  complete run: both return) and started with another config (the chief refuses, the
  worker stops too). Identical weights on both workers; only
  the chief writes the model_dir.
"""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, free_port, job_env

TINY = ("--image_size=32", "--batch_size=8", "--steps_per_epoch=3", "--precision=float32",
        "--early_stopping_patience=0")


def job(*args, env=None, wrapper=None):
    command = [sys.executable, str(wrapper)] if wrapper else \
        [sys.executable, "-m", "pneumo_models.train"]
    return subprocess.Popen([*command, *args], cwd=ROOT, env=job_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=300):
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def history(model_dir):
    with open(Path(model_dir) / "history.csv") as handle:
        return list(csv.DictReader(handle))


def weights(path):
    from pneumo_models import load_model
    return load_model(path).get_weights()


def serves_like_the_model(model_dir, stored=64, size=32):
    """The largest difference between the exported SavedModel's and model.keras's
    probabilities on the same stored-size pixels."""
    import tensorflow as tf

    from pneumo_data.preprocess import to_model_input_np
    from pneumo_models import load_model
    images = np.random.default_rng(0).integers(0, 256, (3, stored, stored, 1)).astype("uint8")
    saved = tf.saved_model.load(str(Path(model_dir) / "export" / "saved_model"))
    served = saved.signatures["serve_pixels"](pixels=tf.constant(images))["probability"]
    model_input = to_model_input_np(images, size).astype("uint8")
    want = load_model(Path(model_dir) / "model.keras").predict(model_input, verbose=0)
    return float(np.max(np.abs(served.numpy().ravel() - want.ravel())))


@pytest.mark.slow
def test_two_replicas_train_like_one_device_through_the_job(prepared, tmp_path):
    # Same global batch of 8 (2 x 4) and, deterministic, the same examples per step; no
    # augmentation or dropout (their draws differ per replica by design, see docs/distributed.md).
    flags = (f"--data_dir={prepared}", *TINY, "--epochs=2", "--deterministic", "--seed=0",
             "--augment=none", "--dropout=0", "--balance=class_weight")
    one, two = tmp_path / "one", tmp_path / "two"
    results = finish([
        job(*flags, "--strategy=one_device", f"--model_dir={one}"),
        job(*flags, "--strategy=mirrored", "--steps_per_execution=2", f"--model_dir={two}",
            env={"PNEUMO_CPU_DEVICES": "2"}),
    ])
    for code, _, stderr in results:
        assert code == 0, stderr[-4000:]
    run_one = json.loads((one / "run.json").read_text())
    run_two = json.loads((two / "run.json").read_text())
    d = run_two["distribution"]
    assert (d["strategy"], d["replicas"], d["workers"]) == ("MirroredStrategy", 2, 1)
    assert d["steps_per_execution"] == 2 and len(d["devices"]) == 2
    assert d["replica_divergence"] == 0.0  # both replicas hold the same weights
    assert run_one["distribution"]["replicas"] == 1
    for a, b in zip(history(one), history(two), strict=True):
        for key in ("loss", "accuracy", "auc", "val_loss", "val_auc", "val_recall"):
            np.testing.assert_allclose(float(b[key]), float(a[key]), rtol=1e-4, atol=1e-5,
                                       err_msg=key)
    for key, value in run_one["val_metrics"].items():
        np.testing.assert_allclose(run_two["val_metrics"][key], value, rtol=1e-4, atol=1e-5)
    w_one, w_two = weights(one / "model.keras"), weights(two / "model.keras")
    scale = max(float(np.max(np.abs(w))) for w in w_one)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w_one, w_two)) < 1e-5 * scale
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert serves_like_the_model(two) < 1e-5


KILLER = """
import hashlib, json, os, signal
import numpy as np
import pneumo_models.callbacks as cb

original = cb.Resume.on_epoch_end


def save_then_die(self, epoch, logs=None):
    # Every worker prints its weights' digest after epoch 1's resume state; the second
    # worker then dies, and the chief finds out at its next collective.
    original(self, epoch, logs)
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes()
                                     for w in self.model.get_weights())).hexdigest()
    print(json.dumps({"out": str(self.out.path), "digest": digest}), flush=True)
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)


cb.Resume.on_epoch_end = save_then_die
from pneumo_data.common.jobs import run_job
from pneumo_models.train import TrainConfig, train

run_job("train", TrainConfig, train)
"""


@pytest.mark.slow
def test_two_workers_die_resume_complete_and_refuse_together(prepared_many_shards, tmp_path):
    from pneumo_models.tf_config import scratch_dir
    try:
        _two_workers(prepared_many_shards, tmp_path)
    finally:  # a failed check leaves no killed worker's scratch folder behind
        import shutil
        shutil.rmtree(scratch_dir(tmp_path / "run", "worker-1"), ignore_errors=True)


def _two_workers(prepared_many_shards, tmp_path):
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    model_dir = tmp_path / "run"
    flags = (f"--data_dir={prepared_many_shards}", *TINY, "--strategy=multi_worker",
             f"--model_dir={model_dir}")

    def workers(*extra, wrapper=None):
        procs = []
        for index in range(2):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            procs.append(job(*flags, *extra, env={"TF_CONFIG": json.dumps(config)},
                             wrapper=wrapper))
        return finish(procs)

    # 1. The second worker dies right after epoch 1's resume state was saved; the chief
    # stops at its next collective with a one-line error.
    killer = tmp_path / "killer.py"
    killer.write_text(textwrap.dedent(KILLER))
    killed = workers("--epochs=2", wrapper=killer)
    assert [code for code, _, _ in killed] == [1, -9], killed[0][2][-3000:]
    assert "another worker of the cluster stopped or cannot be reached" in killed[0][2]
    assert "Traceback" not in killed[0][2]
    chief, worker = (json.loads(next(line for line in stdout.splitlines()
                                     if line.startswith("{"))) for _, stdout, _ in killed)
    assert chief["digest"] == worker["digest"]  # identical weights on both workers
    assert Path(chief["out"]) == model_dir
    scratch = Path(worker["out"])
    assert model_dir not in scratch.parents and scratch.is_dir()
    assert json.loads((model_dir / "resume" / "state.json").read_text())["epoch"] == 0
    assert not (model_dir / "run.json").exists()
    # The second worker comes back on a "fresh machine": nothing of its own to resume from.
    import shutil
    shutil.rmtree(scratch)

    # 2. Started again: both resume from the chief's state and finish.
    done = workers("--epochs=2")
    for code, _, stderr in done:
        assert code == 0, stderr[-4000:]
        assert "resuming from" in stderr and "epoch 2, phase 1" in stderr
    run = json.loads((model_dir / "run.json").read_text())
    d = run["distribution"]
    assert (d["strategy"], d["workers"], d["replicas"], d["task"]) == (
        "MultiWorkerMirroredStrategy", 2, 2, "worker-0")
    assert d["replica_divergence"] == 0.0  # the workers' weight checksums agree
    assert [r["epoch"] for r in history(model_dir)] == ["0", "1"]
    assert not scratch.exists()  # the worker deleted its scratch folder
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == [
        "best.keras", "config.flags", "config.json", "export", "history.csv", "logs",
        "model.keras", "run.json"]
    stamp = (model_dir / "run.json").stat().st_mtime_ns

    # 3. The same command once more: the chief finds the run complete and every worker
    # returns with it (none waits for a peer that will not come).
    again = workers("--epochs=2")
    for code, _, stderr in again:
        assert code == 0 and "already holds this complete run" in stderr, stderr[-3000:]
    assert (model_dir / "run.json").stat().st_mtime_ns == stamp

    # 4. Another config without --overwrite: the chief refuses, the worker stops too.
    refused = workers("--epochs=3")
    assert [code for code, _, _ in refused] == [1, 1]
    assert "holds another run (epochs: 2 -> 3)" in refused[0][2]
    assert "worker-0 stopped with an error before training" in refused[1][2]
    assert "Traceback" not in refused[0][2] + refused[1][2]
    assert (model_dir / "run.json").stat().st_mtime_ns == stamp
    assert not scratch.exists()
