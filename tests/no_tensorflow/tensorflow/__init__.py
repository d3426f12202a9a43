"""A stand-in put first on a job's PYTHONPATH by tests that check a refusal comes before
TensorFlow loads: importing it fails loudly, so a job that loads TensorFlow first fails the
test with this message instead of its own."""

raise ImportError("tests/no_tensorflow: this job imported TensorFlow before its checks")
