import keras
import numpy as np
import pytest
import tensorflow as tf

from pneumo_data.common.errors import UserError
from pneumo_models import models, precision, weights
from pneumo_models.layers import Preprocess

SIZE = 32


def tiny_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype("float32")[:, None]
    images = rng.integers(0, 80, (n, SIZE, SIZE, 1)).astype("uint8")
    images[labels[:, 0] == 1, 8:20, 8:20] += 150  # positives carry a bright square
    return images, labels


def compiled(name, policy="float32", jit=False, augment=True, backend="kernel"):
    model = models.build_model(name, image_size=SIZE, weights="none", precision=policy,
                               augment=augment, augment_backend=backend, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  jit_compile=jit)
    return model


@pytest.mark.parametrize("name", [
    pytest.param(m, marks=pytest.mark.slow) if m in ("vgg16", "resnet50") else m
    for m in models.MODELS])
@pytest.mark.slow
def test_builds_trains_saves_and_reloads_identically(name, tmp_path):
    images, labels = tiny_data()
    model = compiled(name)
    assert model.inputs[0].dtype == "uint8" and model.outputs[0].dtype == "float32"
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = tmp_path / f"{name}.keras"
    model.save(path)
    clone = keras.models.load_model(path)
    np.testing.assert_allclose(clone.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_backbones_are_frozen_and_block5_opens():
    model = models.build_model("vgg16", image_size=SIZE, weights="none")
    base = models.backbone(model)
    assert not base.trainable
    head = {w.name for w in model.trainable_weights}
    assert head and not any("block" in n for n in head)
    opened = models.unfreeze_for_fine_tuning(model, "block5")
    assert opened == 3
    trainable = {l.name for l in base.layers if l.trainable and l.weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}
    with pytest.raises(ValueError, match="no backbone"):
        models.unfreeze_for_fine_tuning(models.build_model("manual_cnn", image_size=SIZE))


def test_manual_cnn_is_the_old_architecture():
    model = models.build_model("manual_cnn", image_size=150, weights="none", augment=False)
    kinds = [type(l).__name__ for l in model.layers[2:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense",
                     "Dropout", "Dense"]
    assert model.get_layer("conv1").filters == 32 and model.get_layer("conv2").filters == 64
    assert model.get_layer("fc").units == 128 and model.get_layer("dropout").rate == 0.5


def test_bn_cnn_architecture():
    """The issue-10 network, kept as --stem=conv (the default is patch4 since issue 20)."""
    model = models.build_model("bn_cnn", image_size=150, weights="none", augment=False,
                               stem="conv")
    assert model.count_params() == 396_473  # the issue-10 research's bn4
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [24, 32, 64, 128, 256]
    assert convs[0].strides == (2, 2) and not any(c.use_bias for c in convs)
    assert all(c.padding == "same" for c in convs)
    assert isinstance(model.get_layer("gap"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("dropout").rate == 0.3
    assert model.get_layer("preprocess").mode == "standardize"
    assert model.get_layer("block4_relu").output.shape[1:3] == (9, 9)
    # the default augmentation is the default recipe's for this network
    aug = models.build_model("bn_cnn", image_size=SIZE, weights="none").get_layer("augment")
    cnn = models.build_model("manual_cnn", image_size=SIZE, weights="none").get_layer("augment")
    assert aug.params.zoom == 0.25 and cnn.params.zoom == 0.1
    assert not aug.params.intensity_is_identity


def test_standardize_and_crop():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 20, 20, 1)).astype("float32")
    gray[2] = 77  # a flat image: divided by 1 grey level, not by ~0
    out = Preprocess("standardize")(gray.astype("uint8")).numpy()
    mean = gray.mean(axis=(1, 2, 3), keepdims=True)
    std = np.maximum(gray.std(axis=(1, 2, 3), keepdims=True), 1.0)
    np.testing.assert_allclose(out, (gray - mean) / std, atol=1e-5)
    assert (out[2] == 0).all()
    # a change of gain and offset (a window change without clipping) moves nothing
    image = rng.integers(60, 180, (1, 20, 20, 1)).astype("float32")
    a = Preprocess("standardize")(image).numpy()
    b = Preprocess("standardize")(0.7 * image + 30).numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)
    cropped = Preprocess("unit", crop=0.1)(gray).numpy()
    np.testing.assert_allclose(cropped, gray[:, 2:18, 2:18] / 255.0, atol=1e-6)
    layer = Preprocess("standardize", crop=0.1)
    assert layer.compute_output_shape((None, 20, 20, 1)) == (None, 16, 16, 1)
    clone = Preprocess.from_config(layer.get_config())
    assert (clone.mode, clone.crop) == ("standardize", 0.1)
    old = {k: v for k, v in Preprocess("unit").get_config().items() if k != "crop"}
    assert Preprocess.from_config(old).crop == 0.0  # layers saved before crop existed


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vgg16", preprocessing="unit"), "caffe"),
    (dict(name="manual_cnn", preprocessing="caffe"), "caffe"),
    (dict(name="bn_cnn", weights="imagenet"), "ImageNet"),
    (dict(name="bn_cnn", crop=0.3), "crop"),
    (dict(name="bn_cnn", dropout=1.0), "dropout"),
])
def test_network_options_are_checked(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=message):
        models.build_model(name, image_size=SIZE, **{"weights": "none", **kwargs})


def test_unit_preprocessing_is_the_seed_recipes():
    model = models.build_model("manual_cnn", image_size=SIZE, weights="none",
                               preprocessing="unit", augment=False)
    assert model.get_layer("preprocess").mode == "unit"
    assert models.build_model("manual_cnn", image_size=SIZE, weights="none").get_layer(
        "preprocess").mode == "standardize"


def test_caffe_preprocessing_matches_keras_applications():
    gray = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype("uint8")
    ours = Preprocess("caffe")(gray).numpy()
    rgb = np.repeat(gray.astype("float32"), 3, axis=-1)
    for application in (keras.applications.vgg16, keras.applications.resnet50):
        np.testing.assert_allclose(ours, application.preprocess_input(rgb.copy()), atol=1e-4)
    np.testing.assert_allclose(Preprocess("unit")(gray).numpy(), gray / 255.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_precision_policies_train(policy):
    images, labels = tiny_data()
    model = compiled("manual_cnn", policy)
    assert model.get_layer("conv1").compute_dtype == policy.removeprefix("mixed_")
    model.fit(images, labels, batch_size=8, epochs=2, verbose=0)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    out = model.predict(images, verbose=0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert keras.config.dtype_policy().name == "float32"  # global policy restored


@pytest.mark.slow
def test_xla_train_step_keeps_augmentation_with_gather_backend():
    images, labels = tiny_data()
    model = compiled("manual_cnn", jit=True, backend="gather")
    layer = model.get_layer("augment")
    assert layer.backend == "gather"
    # The augmentation compiles under XLA and really changes the images in training...
    warp = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    augmented = warp(images).numpy()
    assert augmented.shape == images.shape and not np.allclose(augmented, images)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images)
    # ...which the kernel back end cannot do (no XLA kernel for ImageProjectiveTransformV3).
    kernel = models.build_model("manual_cnn", image_size=SIZE, weights="none",
                                augment_backend="kernel", seed=0).get_layer("augment")
    with pytest.raises(tf.errors.InvalidArgumentError, match="ImageProjectiveTransform"):
        tf.function(lambda x: kernel(x, training=True), jit_compile=True)(images)
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_weights_file_for_backbone_and_whole_model(tmp_path):
    model = models.build_model("vgg16", image_size=SIZE, weights="none", seed=1)
    base = models.backbone(model)
    path = tmp_path / "vgg16_backbone.weights.h5"
    base.save_weights(path)
    again = models.build_model("vgg16", image_size=SIZE, weights=str(path), seed=2)
    for a, b in zip(base.weights, models.backbone(again).weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    cnn = models.build_model("manual_cnn", image_size=SIZE, weights="none", seed=1)
    cnn.save_weights(tmp_path / "cnn.weights.h5")
    cnn2 = models.build_model("manual_cnn", image_size=SIZE,
                              weights=str(tmp_path / "cnn.weights.h5"), seed=2)
    np.testing.assert_array_equal(cnn.get_layer("fc").kernel.numpy(),
                                  cnn2.get_layer("fc").kernel.numpy())
    with pytest.raises(UserError, match="does not exist"):
        models.build_model("manual_cnn", image_size=SIZE, weights=str(tmp_path / "nope.h5"))


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "_network_reachable", lambda host, timeout=3.0: False)
    with pytest.raises(models.WeightsUnavailableError) as error:
        models.build_model("resnet50", image_size=SIZE, weights="imagenet")
    message = str(error.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "models") in message and "--weights=" in message


def test_unknown_model_and_bad_size():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("alexnet")
    with pytest.raises(ValueError, match="image_size"):
        models.build_model("manual_cnn", image_size=0)


def test_precision_resolution():
    assert precision.resolve_precision("auto", gpus=[(8, 0)], flags=set()) == "mixed_float16"
    assert precision.resolve_precision("auto", gpus=[(6, 1)], flags=set()) == "float32"
    assert precision.resolve_precision("auto", gpus=[], flags={"amx_bf16"}) == "mixed_bfloat16"
    assert precision.resolve_precision("auto", gpus=[], flags={"avx512_bf16"}) == "mixed_bfloat16"
    assert precision.resolve_precision("auto", gpus=[], flags={"avx2"}) == "float32"
    assert precision.resolve_precision("float32", gpus=[(8, 0)]) == "float32"
    assert precision.resolve_jit("auto", has_gpu=True) is True
    assert precision.resolve_jit("auto", has_gpu=False) is False
    assert precision.resolve_jit("true") is True
    with pytest.raises(ValueError):
        precision.resolve_precision("float8")


def test_bn_cnn_patch4_stem():
    """Issue 20: the patch4 stem replaces the 75 px stages by a 4x4 space-to-depth; the rest
    of the network and its resolutions are unchanged."""
    model = models.build_model("bn_cnn", image_size=150, weights="none", augment=False,
                               stem="patch4")
    assert model.get_layer("space_to_depth").output.shape[1:] == (38, 38, 16)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 256]
    assert [c.strides for c in convs] == [(1, 1)] * 4
    assert model.get_layer("stem_relu").output.shape[1:] == (38, 38, 32)
    assert model.get_layer("block4_relu").output.shape[1:3] == (9, 9)
    assert "block1_conv" not in [l.name for l in model.layers]
    with pytest.raises(UserError, match="stem"):
        models.build_model("manual_cnn", image_size=SIZE, weights="none", stem="patch4")
    with pytest.raises(UserError, match="stem"):
        models.build_model("bn_cnn", image_size=SIZE, weights="none", stem="patch8")


def test_space_to_depth_pads_by_mirroring_and_moves_patches_into_channels(tmp_path):
    from pneumo_models.layers import SpaceToDepth
    x = np.arange(2 * 6 * 6, dtype="float32").reshape(2, 6, 6, 1)
    y = SpaceToDepth(4)(x).numpy()  # 6 -> padded to 8 (one mirrored row/column each side)
    assert y.shape == (2, 2, 2, 16)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="symmetric")
    np.testing.assert_array_equal(y[0, 0, 1].reshape(4, 4), padded[0, 0:4, 4:8, 0])
    model = models.build_model("bn_cnn", image_size=SIZE, weights="none", stem="patch4",
                               seed=0)
    model.save(tmp_path / "m.keras")
    images, _ = tiny_data()
    np.testing.assert_allclose(models.load_model(tmp_path / "m.keras").predict(images, verbose=0),
                               model.predict(images, verbose=0), rtol=1e-6, atol=1e-6)


def test_stem_auto_is_patch4_for_bn_cnn_and_conv_elsewhere():
    """Issue 20: --stem=auto (the default) resolves to patch4 for bn_cnn; the other networks
    have no stem option and build as before."""
    from pneumo_models.config import NetworkConfig
    assert NetworkConfig().stem == "auto" and NetworkConfig().resolved_stem == "patch4"
    assert NetworkConfig(model="bn_cnn", stem="conv").resolved_stem == "conv"
    assert NetworkConfig(model="manual_cnn").resolved_stem == "conv"
    default = models.build_model("bn_cnn", image_size=150, weights="none", augment=False)
    patch4 = models.build_model("bn_cnn", image_size=150, weights="none", augment=False,
                                stem="patch4")
    assert [l.name for l in default.layers] == [l.name for l in patch4.layers]
    assert default.get_layer("space_to_depth").output.shape[1:] == (38, 38, 16)
    assert default.count_params() == patch4.count_params() == 393_857
    cnn = models.build_model("manual_cnn", image_size=SIZE, weights="none", augment=False)
    same = models.build_model("manual_cnn", image_size=SIZE, weights="none", augment=False,
                              stem="conv")
    assert [l.name for l in cnn.layers] == [l.name for l in same.layers]
    assert cnn.count_params() == same.count_params()
