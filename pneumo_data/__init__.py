"""pneumo_data: chest X-ray folders to TFRecord shards to a rebalanced tf.data stream.

The public API::

    from pneumo_data import read, train_dataset, eval_dataset, steps_per_epoch
    from pneumo_data.prepare import PrepareConfig, prepare

Importing this package does not import TensorFlow; the reader's functions do on first use.
"""

__version__ = "0.2.0"

_LAZY = {
    "read": "pneumo_data.reader",
    "train_dataset": "pneumo_data.reader",
    "eval_dataset": "pneumo_data.reader",
    "steps_per_epoch": "pneumo_data.reader",
    "eval_size": "pneumo_data.reader",
    "eval_shares": "pneumo_data.reader",
    "RandomAffine": "pneumo_data.augment",
    "augment_batch": "pneumo_data.augment",
    "PipelineConfig": "pneumo_data.config",
    "AugmentConfig": "pneumo_data.config",
    "load_manifest": "pneumo_data.manifest",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pneumo_data' has no attribute {name!r}")
