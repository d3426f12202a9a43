"""Every job refuses a bad flag, a missing or foreign input, a folder another job is writing
(its lock), before TensorFlow loads and before it writes anything: each case runs the job as a
user does, with a ``tensorflow`` that fails to import first on its path (tests/no_tensorflow),
so a job that loads TensorFlow before its check fails the case with that message. A refusal
takes a second, not the 10-20 s of TensorFlow's import."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pneumo_data.common.outputs import OutputDir
from tests.helpers import run_module, write_image

pytestmark = pytest.mark.slow  # each case is a process (about a second: no TensorFlow)


def refused(module: str, *args: str, env: dict | None = None) -> str:
    """Runs the job without TensorFlow; asserts exit 1 with a one-line error; returns it."""
    proc = run_module(module, *args, timeout=120, env=env, tensorflow=False)
    assert "tests/no_tensorflow" not in proc.stderr, f"{module} loaded TensorFlow first"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------- flags and paths

@pytest.mark.parametrize("module,args,message", [
    ("pneumo_data.prepare", [], "--output_dir is required"),
    ("pneumo_data.prepare", ["--source_dir=/nope", "--output_dir={tmp}/o"],
     "source_dir /nope does not exist"),
    ("pneumo_data.prepare", ["--output_dir={tmp}/o", "--image_size=0"], "image_size"),
    ("pneumo_models.train", ["--data_dir=/nope", "--model_dir={tmp}/o"],
     "data_dir /nope does not exist"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--epochs=0"], "epochs"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--model=alexnet"], "alexnet"),
    ("pneumo_eval.evaluate", [], "--model_dir is required"),
    ("pneumo_eval.evaluate", ["--model_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("pneumo_eval.predict", [], "--input is required"),
    ("pneumo_eval.predict", ["--model=/nope", "--input=/nope"], "/nope does not exist"),
    ("pneumo_eval.robustness", [], "--model_dir is required"),
    ("pneumo_models.export", [], "--model_dir is required"),
    ("pneumo_models.export", ["--model_dir=/nope"], "/nope"),
    ("pneumo_data.service", ["--role=worker"], "needs --dispatcher_address"),
    ("pneumo_data.visualize", ["--image=/nope.png", "--output={tmp}/o.png"], "/nope.png"),
    ("benchmarks.serving", ["--model_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.prepare", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.encoding", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.accelerator", ["--data_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.accelerator", ["--inputs=disk", "--output_dir={tmp}/o"], "disk"),
    ("benchmarks.resident_rate", ["--data_dir=/nope"], "/nope"),
    ("benchmarks.augment_compare", ["--before_file=/nope.py", "--output_dir={tmp}/o"],
     "/nope.py"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--residency=device",
                             "--data_service=grpc://localhost:1"], "Drop one"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--residency=gpu"], "gpu"),
    ("pneumo_eval.predict", ["--model=/nope", "--input={tmp}", "--output={tmp}/o.csv",
                             "--threshold=0.3", "--threshold_from={tmp}/r.json"], "not both"),
    ("pneumo_eval.predict", ["--model=/nope", "--input={tmp}", "--output={tmp}/o.csv"],
     "holds no files"),
    ("benchmarks.encoding", ["--images=0", "--output_dir={tmp}/o"], "--images"),
    ("benchmarks.throughput", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.train_step", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.epoch", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("benchmarks.scaling", ["--source_dir=/nope", "--output_dir={tmp}/o"], "/nope"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--model=manual_cnn", "--stem=patch4"],
     "option of bn_cnn"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--ema_momentum=1"], "ema_momentum"),
    ("pneumo_models.train", ["--model_dir={tmp}/o", "--budget_plan=probe",
                             "--time_budget_minutes=0"], "budget_plan=probe"),
    ("benchmarks.train_step", ["--stems=patch8", "--output_dir={tmp}/o"], "patch8"),
    ("benchmarks.train_step", ["--rounds=0", "--output_dir={tmp}/o"], "rounds"),
])
def test_bad_flags_and_paths(module, args, message, tmp_path):
    line = refused(module, *(a.format(tmp=tmp_path) for a in args))
    assert message in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_an_image_folder_given_as_data_dir_suggests_a_command_that_works(tmp_path):
    write_image(tmp_path / "xrays" / "NORMAL" / "a.png")
    write_image(tmp_path / "xrays" / "PNEUMONIA" / "b.png")
    line = refused("pneumo_models.train", f"--data_dir={tmp_path / 'xrays'}",
                   f"--model_dir={tmp_path / 'run'}")
    assert f"--source_dir={tmp_path / 'xrays'}" in line and "prepare" in line
    assert not (tmp_path / "run").exists()
    # The suggested prepare is not refused for writing inside its source.
    assert f"--output_dir={tmp_path / 'xrays'}-prepared" in line


# ---------------------------------------------------------------- inputs of trained runs

def test_evaluate_refuses_an_unknown_split_and_leaves_no_folder(trained_model_dir, tmp_path):
    line = refused("pneumo_eval.evaluate", f"--model_dir={trained_model_dir}", "--split=nope",
                   f"--output_dir={tmp_path / 'eval'}")
    assert "nope" in line
    assert not (tmp_path / "eval").exists()
    before = tree(trained_model_dir)
    refused("pneumo_eval.evaluate", f"--model_dir={trained_model_dir}", "--split=nope")
    assert tree(trained_model_dir) == before and not (trained_model_dir / "eval-nope").exists()


def test_a_folder_another_job_is_writing_is_refused_at_once(trained_model_dir, tmp_path):
    with OutputDir(tmp_path / "eval", "evaluate"):
        line = refused("pneumo_eval.evaluate", f"--model_dir={trained_model_dir}",
                       f"--output_dir={tmp_path / 'eval'}")
    assert f"is being written by pid {os.getpid()}" in line
    with OutputDir(tmp_path / "rob", "robustness"):
        line = refused("pneumo_eval.robustness", f"--model_dir={trained_model_dir}",
                       f"--output_dir={tmp_path / 'rob'}")
    assert f"is being written by pid {os.getpid()}" in line


def test_a_threshold_file_that_is_not_a_report_is_refused_by_export(trained_model_dir, tmp_path):
    (tmp_path / "report.json").write_text('{"threshold": 0.3}')
    before = tree(trained_model_dir)
    line = refused("pneumo_models.export", f"--model_dir={trained_model_dir}",
                   f"--threshold_from={tmp_path / 'report.json'}")
    assert "report.json" in line
    assert tree(trained_model_dir) == before


# ---------------------------------------------------------------- outputs that are not ours

def test_outputs_holding_a_users_files_are_refused_untouched(trained_model_dir,
                                                             synthetic_source, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "labels.csv").write_text("path,probability,label\nx.png,0.9,pneumonia\n")
    before = tree(mine)
    image = next((synthetic_source / "test" / "NORMAL").iterdir())
    cases = [
        ("pneumo_data.prepare", f"--source_dir={synthetic_source}", f"--output_dir={mine}"),
        ("pneumo_models.train", f"--model_dir={mine}"),
        ("pneumo_eval.evaluate", f"--model_dir={trained_model_dir}", f"--output_dir={mine}"),
        ("pneumo_eval.robustness", f"--model_dir={trained_model_dir}", f"--output_dir={mine}"),
        ("pneumo_eval.predict", f"--model_dir={trained_model_dir}", f"--input={image}",
         f"--output={mine / 'labels.csv'}"),
        ("pneumo_data.visualize", f"--output={mine / 'labels.csv'}"),
    ]
    for module, *args in cases:
        flags = [[], ["--overwrite"]] if module in OVERWRITE_JOBS else [[]]
        for extra in flags:
            line = refused(module, *args, *extra)
            assert "labels.csv" in line or "notes.txt" in line, (module, extra, line)
            assert tree(mine) == before, (module, extra)


# Jobs with --overwrite: it replaces only what the job itself wrote.
OVERWRITE_JOBS = {"pneumo_data.prepare", "pneumo_models.train"}


# ---------------------------------------------------------------- servers and ports

def test_a_port_in_use_is_refused_in_one_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = refused("pneumo_data.service", "--role=dispatcher", f"--port={port}")
        assert f"port {port} is in use" in line
        line = refused("pneumo_data.service", "--role=worker", f"--port={port}",
                       "--dispatcher_address=localhost:1")
        assert f"port {port} is in use" in line


def test_train_against_a_data_service_nobody_runs_fails_at_once(prepared_many_shards,
                                                                tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]  # free, and nobody listens after the with
    line = refused("pneumo_models.train", f"--data_dir={prepared_many_shards}",
                   f"--model_dir={tmp_path / 'run'}", f"--data_service=grpc://localhost:{port}")
    assert f"nothing answers at grpc://localhost:{port}" in line
    assert not (tmp_path / "run").exists()


def test_a_data_service_short_of_shards_is_refused_before_writing(prepared, tmp_path):
    line = refused("pneumo_models.train", f"--data_dir={prepared}",
                   f"--model_dir={tmp_path / 'run'}", "--data_service=grpc://localhost:1")
    assert "shard" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- ImageNet weights offline

def test_imagenet_weights_offline_are_refused_before_the_run_exists(prepared, tmp_path):
    from pneumo_models import weights
    host = weights.BACKBONES["vgg16"][2].split("/")[2]
    if weights._network_reachable(host):
        pytest.skip(f"{host} answers from here: the offline refusal cannot be provoked")
    env = {"KERAS_HOME": str(tmp_path / "keras")}  # an empty cache
    line = refused("pneumo_models.train", f"--data_dir={prepared}",
                   f"--model_dir={tmp_path / 'run'}", "--model=vgg16", env=env)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in line and "--weights=" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module,name", [
    ("benchmarks.throughput", "x"), ("benchmarks.train_step", "x"), ("benchmarks.epoch", "x"),
    ("benchmarks.encoding", "x"), ("benchmarks.scaling", "x"), ("benchmarks.resident_rate", "x"),
])
def test_benchmarks_refuse_a_foreign_result_file_before_measuring(module, name, tmp_path):
    """A user's file where the result would go is refused before TensorFlow loads (not after
    minutes of measuring), and stays as it was."""
    mine = tmp_path / "out" / f"{name}.json"
    mine.parent.mkdir()
    mine.write_text("mine")
    args = [f"--name={name}", f"--output_dir={mine.parent}"]
    if module == "benchmarks.resident_rate":  # needs a prepared folder: any manifest will do
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "manifest.json").write_text("{}")
        args.append(f"--data_dir={tmp_path / 'data'}")
    line = refused(module, *args)
    assert "not written by a pneumo benchmark" in line
    assert mine.read_text() == "mine"
