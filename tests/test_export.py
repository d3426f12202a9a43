import io

import numpy as np
import tensorflow as tf
from PIL import Image

from pneumo_models.export import export_serving
from pneumo_models.models import build_model


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, "PNG")
    return buffer.getvalue()


def test_serving_signature_matches_the_model(tmp_path):
    model = build_model("manual_cnn", image_size=32, weights="none", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1)).astype("uint8")
    export_serving(model, tmp_path / "export")
    serve = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    got = serve(images=tf.constant([png(i[..., 0]) for i in images]))["probability"].numpy()
    want = model.predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Larger RGB JPEGs are decoded to gray and resized to the model's input.
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 64, 3)).astype("uint8"))
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG")
    out = serve(images=tf.constant([buffer.getvalue()]))["probability"].numpy()
    assert out.shape == (1,) and 0 <= out[0] <= 1
    assert not (tmp_path / "export.partial").exists()
