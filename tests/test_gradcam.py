import keras
import numpy as np
import pytest
from PIL import Image

from pneumo_data import synthetic
from pneumo_eval.gradcam import grad_cam, last_conv_layer
from pneumo_models.models import build_model

SIZE = 64


def planted_images(n, seed):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 2
        pixels = synthetic.render(rng, "bacterial" if label else "none", 96, 96,
                                  planted_region=True)
        images.append(np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE)))[..., None])
        labels.append(label)
    return np.array(images, np.uint8), np.array(labels, np.float32)[:, None]


@pytest.fixture(scope="module")
def trained():
    x, y = planted_images(240, 0)
    model = build_model("manual_cnn", image_size=SIZE, weights="none", augment=False, seed=0,
                        preprocessing="unit")
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    model.fit(x, y, batch_size=16, epochs=4, verbose=0)
    return model


def test_peak_falls_inside_the_planted_region(trained):
    x, y = planted_images(40, 1)
    positives = x[y[:, 0] == 1]
    assert trained.predict(positives, verbose=0).mean() > 0.9
    heat = grad_cam(trained, positives)
    assert heat.shape == (len(positives), SIZE, SIZE)
    assert heat.min() >= 0 and heat.max() <= 1
    x0, y0, x1, y1 = synthetic.PLANTED_BOX
    margin = 3
    inside = 0
    for h in heat:
        row, col = np.unravel_index(np.argmax(h), h.shape)
        inside += (x0 * SIZE - margin <= col <= x1 * SIZE + margin
                   and y0 * SIZE - margin <= row <= y1 * SIZE + margin)
    assert inside >= 0.8 * len(heat), inside


@pytest.mark.parametrize("name,layer,policy", [
    ("manual_cnn", "conv2", "mixed_bfloat16"),
    ("bn_cnn", "block4_relu", "mixed_bfloat16"),
    pytest.param("vgg16", "block5_conv3", "float32", marks=pytest.mark.slow),
    pytest.param("resnet50", "conv5_block3_out", "mixed_float16", marks=pytest.mark.slow),
])
def test_finds_last_conv_layer_for_every_model_and_precision(name, layer, policy):
    model = build_model(name, image_size=SIZE, weights="none", precision=policy, seed=0)
    assert last_conv_layer(model)[1] == layer
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 1)).astype(np.uint8)
    heat = grad_cam(model, images)
    assert heat.shape == (2, SIZE, SIZE) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_a_cropping_model_gets_no_heat_on_the_cut_border():
    model = build_model("bn_cnn", image_size=SIZE, weights="none", crop=0.1, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 1)).astype(np.uint8)
    heat = grad_cam(model, images)
    margin = round(0.1 * SIZE)
    assert heat.shape == (2, SIZE, SIZE)
    assert (heat[:, :margin] == 0).all() and (heat[:, :, -margin:] == 0).all()
    assert heat[:, margin:-margin, margin:-margin].max() > 0
