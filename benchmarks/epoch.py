r"""Wall time of one training epoch of the manual CNN: the old recipe against pneumo.

    python -m benchmarks.epoch
    python -m benchmarks.epoch --source_dir=../shared/data/chest_xray_224 --plot

Old recipe: tf_keras ``ImageDataGenerator.flow_from_directory`` (RGB, rescale
1/255, its augmentation) feeding the same architecture in tf_keras, float32.
pneumo: its defaults (shards prepared once, the cached uint8 stream balanced by
sampling, device augmentation, precision and XLA chosen per device). Both run
the same number of images per epoch (the train folder once); the first epoch
and a second one are timed, as a user sees them. Ingest (prepare) time is
reported separately: it is paid once per dataset, not per epoch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from benchmarks.common import OLD_AUGMENTATION, class_root
from pneumo_data.common.jobs import import_tensorflow
from pneumo_models.train import train_config

flags.DEFINE_integer("epochs", 2, "Epochs to time for each recipe.")
flags.DEFINE_integer("max_images", 0, "Cap on images per epoch (0: the whole train folder).")
common.define_common_flags()
FLAGS = flags.FLAGS


class _EpochTimer:
    def __init__(self):
        self.times = []

    def begin(self):
        self.start = time.perf_counter()

    def end(self):
        self.times.append(time.perf_counter() - self.start)


def old_recipe(root: str, size: int, batch: int, steps: int, epochs: int) -> list[float]:
    import tf_keras
    from tf_keras.preprocessing.image import ImageDataGenerator
    gen = ImageDataGenerator(rescale=1 / 255.0, **OLD_AUGMENTATION).flow_from_directory(
        root, target_size=(size, size), batch_size=batch, class_mode="binary")
    layers = tf_keras.layers
    model = tf_keras.Sequential([
        layers.Conv2D(32, (3, 3), activation="relu", input_shape=(size, size, 3)),
        layers.MaxPooling2D(2, 2), layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D(2, 2), layers.Flatten(), layers.Dense(128, activation="relu"),
        layers.Dropout(0.5), layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    timer = _EpochTimer()
    cb = tf_keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, l: timer.begin(),
                                           on_epoch_end=lambda e, l: timer.end())
    model.fit(gen, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[cb])
    return timer.times


def pneumo_recipe(data_dir: str, size: int, batch: int, steps: int, epochs: int) -> tuple:
    import keras

    from pneumo_data.reader import train_dataset
    from pneumo_models.models import build_model
    from pneumo_models.precision import resolve_jit, resolve_precision
    from pneumo_models.training import _compile
    policy, jit = resolve_precision("auto"), resolve_jit("auto")
    # The seed's recipe, as the old one: affine augmentation only, x/255, Adam 1e-3.
    seed = train_config("seed")
    model = build_model("manual_cnn", image_size=size, weights="none", precision=policy,
                        augment=seed.pipeline.augmentation, preprocessing="unit",
                        augment_backend="gather" if jit else "fused", seed=0)
    _compile(model, seed, 1e-3, jit)
    stream = train_dataset(data_dir, batch_size=batch, image_size=size)
    timer = _EpochTimer()
    cb = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, l: timer.begin(),
                                        on_epoch_end=lambda e, l: timer.end())
    model.fit(stream, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[cb],
              shuffle=False)
    return timer.times, policy, jit


def main(argv):
    del argv
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    name = FLAGS.name or f"epoch-{Path(source_dir).name}"
    common.check_writable(*common.result_paths(name, FLAGS.output_dir, FLAGS.plot))
    import_tensorflow()  # the benchmark's TensorFlow half is imported where it is used
    root = class_root(source_dir)
    size, batch = FLAGS.image_size, FLAGS.batch_size
    with common.prepared_train_folder(source_dir, "pneumo-bench-epoch-") as (
            work, m, prepare_seconds):
        images = m.count("train")
        if FLAGS.max_images:
            images = min(images, FLAGS.max_images)
        steps = max(1, math.ceil(images / batch))
        old = old_recipe(root, size, batch, steps, FLAGS.epochs)
        ours, policy, jit = pneumo_recipe(work, size, batch, steps, FLAGS.epochs)
    rows = [["old recipe (ImageDataGenerator + tf_keras, float32, RGB)"]
            + [f"{t:.1f}" for t in old] + [f"{steps * batch / old[-1]:.0f}"],
            [f"pneumo, same network and augmentation ({policy}, XLA {'on' if jit else 'off'}, "
             f"device augmentation)"]
            + [f"{t:.1f}" for t in ours] + [f"{steps * batch / ours[-1]:.0f}"]]
    header = ["recipe"] + [f"epoch {i + 1} s" for i in range(FLAGS.epochs)] + [
        "img/s (last epoch)"]
    ratio = old[-1] / ours[-1]
    table = common.markdown_table(header, rows)
    table += (f"\n\nOld recipe / pneumo, last epoch: {ratio:.2f}x. {steps} steps x {batch} "
              f"images per epoch from {source_dir} at {size}x{size}; pneumo's one-time "
              f"prepare took {prepare_seconds:.1f}s.")
    path = common.write_results(name, FLAGS.output_dir, {
        "environment": common.environment(), "source_dir": source_dir, "image_size": size,
        "batch_size": batch, "steps_per_epoch": steps, "old_recipe_seconds": old,
        "pneumo_seconds": ours, "pneumo_precision": policy, "pneumo_jit": jit,
        "prepare_seconds": prepare_seconds, "old_over_pneumo_last_epoch": ratio}, table)
    if FLAGS.plot:
        common.bar_chart(path.with_suffix(".png"),
                         {"old recipe": old[-1], "pneumo": ours[-1]}, "seconds per epoch",
                         f"One epoch of the manual CNN, {size}x{size}")


if __name__ == "__main__":
    common.run(main)
