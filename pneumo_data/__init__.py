"""pneumo_data: chest X-ray folders to TFRecord shards to a rebalanced tf.data stream.

The public API::

    from pneumo_data import train_dataset, eval_dataset, steps_per_epoch
    from pneumo_data.prepare import PrepareConfig, prepare

Importing this package does not import TensorFlow; the pipeline functions do
on first use.
"""

__version__ = "0.1.0"

__all__ = ["train_dataset", "eval_dataset", "steps_per_epoch", "eval_size", "PipelineConfig",
           "RandomAffine", "AffineParams", "load_manifest"]


def __getattr__(name):
    if name in ("train_dataset", "eval_dataset", "steps_per_epoch", "eval_size",
                "PipelineConfig", "train_dataset_from_config"):
        from pneumo_data import pipeline
        return getattr(pipeline, name)
    if name in ("RandomAffine", "AffineParams", "augment_batch"):
        from pneumo_data import augment
        return getattr(augment, name)
    if name == "load_manifest":
        from pneumo_data.manifest import load_manifest
        return load_manifest
    raise AttributeError(f"module 'pneumo_data' has no attribute {name!r}")
