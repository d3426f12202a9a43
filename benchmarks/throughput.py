r"""Input throughput: the old recipe against this library, same images, same process.

    python -m benchmarks.throughput                       # embedded default data
    python -m benchmarks.throughput --source_dir=../shared/data/chest_xray_fullres --plot

Rows (150x150, batch 32 by default; warm-up excluded, median of --repeats):

1. old recipe: tf_keras ``ImageDataGenerator.flow_from_directory`` with its
   augmentation (rotation 15, shifts 0.1, shear 0.1, zoom 0.1, flip, nearest)
2. ``keras.utils.image_dataset_from_directory`` + five keras-cv layers in tf.data
3. pneumo, ``augment='host'`` (the fused warp in tf.data), the seed recipe's ranges
   (affine only)
4. the same with the default recipe's augmentation (affine with zoom 0.25, then the
   intensity transforms: gamma, contrast, brightness, blur with probability 0.3, noise)
5. pneumo, ``augment='device'``: the stream that leaves the host
6. pneumo, ``augment='device'`` + the augmentation layer run where the model runs,
   affine only
7. the same, affine + intensity (the default)
8. pneumo, ``residency='device'``: class-balanced batches drawn from the train split held
   in device memory, one compiled ``next_batch`` call per batch (omitted, with the reason
   printed, when the set is refused)
9. ceiling: one in-memory batch repeated

A second table times the augmentation alone on one in-memory batch: the fused layer
with the intensity transforms off and on (the cost of issue 10's intensity
augmentation, measured in the same run) on the stream's uint8 batch, against the chain
of five keras-cv layers on the same pixels as float32 (what
``image_dataset_from_directory`` hands it).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from absl import flags

from benchmarks import common
from benchmarks.common import OLD_AUGMENTATION, class_root
from pneumo_data.common.jobs import import_tensorflow

flags.DEFINE_integer("repeats", 3, "Timed repeats per row.")
flags.DEFINE_float("seconds", 3.0, "Minimum seconds per timed repeat.")
common.define_common_flags()
FLAGS = flags.FLAGS

def measure(iterator_factory, seconds: float, repeats: int, batch_size: int,
            warmup_batches: int) -> dict:
    """images/s of an iterator of batches: warm-up, then ``repeats`` windows."""
    iterator = iterator_factory()
    for _ in range(warmup_batches):
        next(iterator)
    rates = []
    for _ in range(repeats):
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            batch = next(iterator)
            images += len(batch[0]) if isinstance(batch, tuple) else len(batch)
        rates.append(images / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": repeats}


def old_recipe(root: str, size: int, batch: int):
    from tf_keras.preprocessing.image import ImageDataGenerator
    gen = ImageDataGenerator(rescale=1 / 255.0, **OLD_AUGMENTATION)
    return lambda: iter(gen.flow_from_directory(root, target_size=(size, size), batch_size=batch,
                                                class_mode="binary", shuffle=True))


five_keras_cv_layers = common.five_keras_cv_layers


def keras_directory_recipe(root: str, size: int, batch: int):
    import keras
    import tensorflow as tf
    layers = five_keras_cv_layers()

    def augment(images, labels):
        for layer in layers:
            images = layer(images)
        return images, labels

    def factory():
        ds = keras.utils.image_dataset_from_directory(root, image_size=(size, size),
                                                      batch_size=batch, label_mode="binary",
                                                      shuffle=True, verbose=False)
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).repeat()
        return iter(ds.prefetch(tf.data.AUTOTUNE))
    return factory


AFFINE_ONLY = "affine only (seed recipe)"
WITH_INTENSITY = "affine + intensity (default)"


def augmentations() -> dict:
    from pneumo_data.config import AugmentConfig
    return {AFFINE_ONLY: AugmentConfig.seed_recipe(), WITH_INTENSITY: AugmentConfig()}


def pneumo_stream(data_dir: str, size: int, batch: int, augment: str, on_device: bool = False,
                  params=None):
    import tensorflow as tf

    import pneumo_data
    from pneumo_data.augment import RandomAffine
    from pneumo_data.config import AugmentConfig
    params = params or AugmentConfig.seed_recipe()
    layer = RandomAffine.from_params(params)

    @tf.function
    def device_step(images):
        return layer(images, training=True)

    def factory():
        ds = pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                       augment=augment, augmentation=params)
        iterator = iter(ds)
        if not on_device:
            return iterator
        return ((device_step(x), y) for x, y in iterator)
    return factory


def resident(data_dir: str, size: int, batch: int):
    """The device-resident set's draws, one compiled ``next_batch`` call per batch (the
    training job calls it inside its step instead); None when the set is refused."""
    import tensorflow as tf

    from pneumo_data import reader
    from pneumo_data.config import PipelineConfig
    config = PipelineConfig(batch_size=batch, image_size=size, augment="device",
                            residency="device")
    source, reason = reader.resident_or_stream(data_dir, config, seed=0)
    if reason is not None:
        print(f"device-resident set refused: {reason}", flush=True)
        return None
    draw = tf.function(source.next_batch)

    def factory():
        while True:
            yield draw()
    return factory


def ceiling(data_dir: str, size: int, batch: int):
    import tensorflow as tf

    import pneumo_data
    first = next(iter(pneumo_data.train_dataset(data_dir, batch_size=batch, image_size=size,
                                                augment="none")))
    return lambda: iter(tf.data.Dataset.from_tensors(first).repeat().prefetch(tf.data.AUTOTUNE))


def augmentation_alone(size: int, batch: int, seconds: float, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from pneumo_data.augment import RandomAffine
    pixels = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 1)).astype(np.uint8)
    images = tf.constant(pixels, tf.float32)  # the chain's input: image_dataset_from_directory
    stream = tf.constant(pixels)              # the layer's: the stream's uint8 batch
    chain = five_keras_cv_layers()

    def fused(params):
        layer = RandomAffine.from_params(params)
        return tf.function(lambda: layer(stream, training=True))

    @tf.function
    def run_chain():
        out = images
        for layer in chain:
            out = layer(out)
        return out

    result = {}
    runs = [(f"pneumo RandomAffine, {name}", fused(params))
            for name, params in augmentations().items()]
    for name, fn in (*runs, ("five keras-cv layers", run_chain)):
        def gen(fn=fn):
            while True:
                yield (fn().numpy(),)
        result[name] = measure(gen, seconds, repeats, batch, warmup_batches=3)
    return result


def main(argv):
    del argv
    source_dir = common.source_dir(FLAGS.source_dir)  # refused before TensorFlow loads
    result_name = FLAGS.name or f"throughput-{Path(source_dir).name}"
    common.check_writable(*common.result_paths(result_name, FLAGS.output_dir, FLAGS.plot))
    import_tensorflow()  # TensorFlow's start-up and C++ INFO lines filtered (see jobs)
    size, batch = FLAGS.image_size, FLAGS.batch_size
    root = class_root(source_dir)
    with common.prepared_train_folder(source_dir, "pneumo-bench-throughput-") as (
            work, m, prepare_seconds):
        train_images = m.count("train")
        cache_fill = max(2, train_images // batch + 2)  # warm-up covers the first (caching) epoch
        rows = [
            ("old recipe: ImageDataGenerator.flow_from_directory + augmentation",
             old_recipe(root, size, batch), 2),
            ("image_dataset_from_directory + 5 keras-cv layers",
             keras_directory_recipe(root, size, batch), 3),
            *[(f"pneumo augment='host', {name}",
               pneumo_stream(work, size, batch, "host", params=params), cache_fill)
              for name, params in augmentations().items()],
            ("pneumo augment='device': stream leaving the host",
             pneumo_stream(work, size, batch, "device"), cache_fill),
            *[(f"pneumo augment='device' + augmentation where the model runs, {name}",
               pneumo_stream(work, size, batch, "device", on_device=True, params=params),
               cache_fill)
              for name, params in augmentations().items()],
            ("pneumo residency='device': batches drawn from the set in device memory",
             resident(work, size, batch), 3),
            ("ceiling: one in-memory batch repeated", ceiling(work, size, batch), 3),
        ]
        rows = [row for row in rows if row[1] is not None]
        results = {}
        for name, factory, warmup in rows:
            results[name] = measure(factory, FLAGS.seconds, FLAGS.repeats, batch, warmup)
            print(f"{name}: {results[name]['median']:,.0f} img/s", flush=True)
        aug = augmentation_alone(size, batch, FLAGS.seconds, FLAGS.repeats)

    base = results[rows[0][0]]["median"]
    top = results[rows[-1][0]]["median"]
    table_rows = [[name, r["median"], f"{r['min']:,.0f}-{r['max']:,.0f}",
                   f"{r['median'] / base:.1f}x", f"{r['median'] / top:.1%}"]
                  for name, r in results.items()]
    table = common.markdown_table(
        ["input pipeline", "img/s (median)", "range", "vs old recipe", "of ceiling"], table_rows)
    fused, fused_intensity, chain = aug.values()
    table += "\n\n" + common.markdown_table(
        ["augmentation alone (one in-memory batch)", "img/s (median)", "range"],
        [[name, r["median"], f"{r['min']:,.0f}-{r['max']:,.0f}"] for name, r in aug.items()])
    table += (f"\n\nFused warp vs five-layer chain: {fused['median'] / chain['median']:.1f}x. "
              f"Intensity transforms on vs off (the fused layer alone): "
              f"{fused_intensity['median'] / fused['median']:.2f}x the images/s. "
              f"Images: {train_images} from {source_dir} ({size}x{size}, batch {batch}); "
              f"prepare took {prepare_seconds:.1f}s (not in the rates).")
    payload = {"environment": common.environment(), "gpu_memory": common.gpu_memory(),
               "source_dir": source_dir, "images": train_images, "image_size": size,
               "batch_size": batch, "seconds_per_repeat": FLAGS.seconds,
               "prepare_seconds": prepare_seconds, "results": results,
               "augmentation_alone": aug,
               "fused_over_chain": fused["median"] / chain["median"],
               "intensity_on_over_off": fused_intensity["median"] / fused["median"]}
    path = common.write_results(result_name, FLAGS.output_dir, payload, table)
    if FLAGS.plot:
        common.bar_chart(path.with_suffix(".png"), {k: v["median"] for k, v in results.items()},
                         "images/s", f"Input throughput, {size}x{size}, batch {batch}")


if __name__ == "__main__":
    common.run(main)
