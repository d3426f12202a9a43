"""pneumo_models: uint8-input Keras models, the training job and model exports.

    import pneumo_models
    model = pneumo_models.build_model("manual_cnn", image_size=150)
    model = pneumo_models.load_model("runs/cnn/model.keras")

Importing this package does not import TensorFlow; these functions do on first use
(:mod:`pneumo_models.models`).
"""

_LAZY = {"build_model": "pneumo_models.models", "load_model": "pneumo_models.models"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pneumo_models' has no attribute {name!r}")
