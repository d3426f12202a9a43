"""Plumbing every pneumo package shares (and that imports no TensorFlow).

* :mod:`pneumo_data.common.config`: frozen dataclass configs <-> absl flags, one flag per
  leaf field.
* :mod:`pneumo_data.common.jobs`: ``run_job`` (the ``__main__`` of every job), ``UserError``,
  the quiet TensorFlow import.
* :mod:`pneumo_data.common.files`: outputs that appear complete or not at all (one partial-name
  convention for files and folders), JSON writing, file hashing.
* :mod:`pneumo_data.common.outputs`: one writer per output folder (an exclusive lock) and a
  ledger of what a job wrote there, so a job only ever deletes or rewrites its own files.
"""
