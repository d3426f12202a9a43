import textwrap

import pytest

from pneumo_data.common import jobs
from tests.helpers import run_code


def test_noise_filter_drops_startup_lines_and_keeps_the_rest():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795730596.189821    6609 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1795730596.190105    6609 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1795730600.829820    6609 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error",
        "To enable the following instructions: AVX2 AVX512F, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    kept = ["E0000 00:00:1795730600.829820    6609 gpu_device.cc:2344] Cannot dlopen some GPU "
            "libraries.", "Traceback (most recent call last):", "prepare: error: x"]
    assert all(jobs._is_noise(line) for line in noise)
    assert not any(jobs._is_noise(line) for line in kept)


def run_script(code: str, *args: str):
    """``code`` in a fresh process with the environment a user has (no log-level override)."""
    return run_code(textwrap.dedent(code), *args, env={"TF_CPP_MIN_LOG_LEVEL": None})


@pytest.mark.slow
def test_run_job_reports_user_errors_and_keeps_tracebacks_of_bugs(tmp_path):
    template = """
        import dataclasses
        from pneumo_data.common.config import option
        from pneumo_data.common.errors import UserError
        from pneumo_data.common.jobs import run_job

        @dataclasses.dataclass(frozen=True)
        class C:
            kind: str = option("user", "which failure")

        def job(config):
            if config.kind == "user":
                raise UserError("the folder is missing")
            if config.kind == "permission":
                open("/proc/version", "w")
            raise KeyError("a bug")

        run_job("demo", C, job)
    """
    user = run_script(template)
    assert user.returncode == 1 and user.stderr.strip() == "demo: error: the folder is missing"
    bug = run_script(template, "--kind=bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError" in bug.stderr
    extra = run_script(template, "stray")
    assert extra.returncode == 1 and "demo: error: unexpected arguments ['stray']" in extra.stderr


@pytest.mark.slow
def test_import_tensorflow_is_quiet_unless_verbose():
    quiet = run_script("""
        from pneumo_data.common.jobs import import_tensorflow
        tf = import_tensorflow(0)
        print(tf.constant(2).numpy())
    """)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "2"
    assert not any(jobs._is_noise(line) for line in quiet.stderr.splitlines()), quiet.stderr
    assert "absl::InitializeLog" not in quiet.stderr
