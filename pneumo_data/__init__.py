"""pneumo_data: chest X-ray folders to TFRecord shards to a rebalanced tf.data stream."""

__version__ = "0.1.0"
