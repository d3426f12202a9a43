"""pneumo_models: uint8-input Keras models, the training job and model exports.

    import pneumo_models
    model = pneumo_models.build_model("manual_cnn", image_size=150)
    model = pneumo_models.load_model("runs/cnn/model.keras")

Importing this package does not import TensorFlow; these functions do on first use.
"""

__all__ = ["build_model", "load_model"]


def build_model(*args, **kwargs):
    """See :func:`pneumo_models.models.build_model`."""
    from pneumo_models.models import build_model as build
    return build(*args, **kwargs)


def load_model(path, **kwargs):
    """See :func:`pneumo_models.models.load_model`."""
    from pneumo_models.models import load_model as load
    return load(path, **kwargs)
