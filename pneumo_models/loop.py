"""One training loop for every tf.distribute strategy, driving standard Keras callbacks.

::

    strategy = distribute.make_strategy("mirrored")
    with strategy.scope():
        model = models.build_model("manual_cnn", ...)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),   # saved models keep its state
                      loss=keras.losses.BinaryCrossentropy(label_smoothing=0.1))
    loop = TrainingLoop(model, strategy, optimizer=model.optimizer, loss=model.loss,
                        steps_per_execution=4)
    val = loop.eval_input(lambda ctx: pneumo_data.eval_dataset(data_dir, "val",
                                                               input_context=ctx),
                          num_examples=pneumo_data.eval_size(data_dir, "val"), batch_size=32)
    history = loop.fit(lambda ctx: pneumo_data.train_dataset(data_dir, batch_size=32,
                                                             input_context=ctx),
                       batch_size=32, steps_per_epoch=100, epochs=10, validation=val,
                       callbacks=[keras.callbacks.CSVLogger("history.csv"), ...])

Why one loop instead of ``model.fit`` where it works: with TensorFlow 2.21 / Keras
3.15 ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so a
custom step is needed there anyway. Running that same step on one device (one
replica) and on N keeps one code path for class weights, loss scaling, metrics,
callbacks and resume, tested once, instead of two paths whose history.csv and
checkpoints could drift apart.

The step (``strategy.run`` of a replica function, traced once by ``tf.function``):

* the loss is the given loss object's per-example value (a
  ``keras.losses.Loss``: its ``call``, so its label smoothing applies; or a
  function ``(y, p) -> [B]``), times the example's class weight when given,
  summed and divided by the *global* batch: summing the replicas' gradients (the Keras optimizer
  all-reduces them) then gives the gradient of the global batch mean, as on one
  device with the same global batch;
* with a ``LossScaleOptimizer`` (Keras wraps the optimizer in one under
  ``mixed_float16``) the loss is scaled by ``scale_loss`` and ``apply`` unscales;
  before that the replicas agree on whether *any* replica's gradients are
  non-finite. Keras 3.15 decides from the first replica alone under
  MirroredStrategy (measured: an infinite gradient on replica 1 only made every
  weight -inf) and per replica without merge calls (replicas would disagree and
  the all-reduce would hang); here all replicas skip the step together.
* metrics are updated once per step, outside the replicas, from the labels and
  predictions gathered from every replica (``strategy.gather``): the global
  batch, in replica order, so every worker computes identical values and takes
  identical decisions (early stopping, NaN guard). Training metrics use the class
  weights as sample weights, as ``fit(class_weight=...)`` does.

Validation pads each input pipeline's share of the finite eval set with
zero-weight examples to the same number of full batches, so shapes stay static
(XLA, TPU) and every example is counted exactly once, also when the last batch
holds fewer examples than there are replicas. The count is checked after each
pass.

At the end of ``fit`` (after the last epoch, or a stop) the optimizer's
``finalize_variable_values`` runs, as in Keras's ``fit``: with a weight average
(``use_ema``, ``--ema_momentum``) the model then holds the averaged weights, on the
stream and on a device-resident set alike (:meth:`TrainingLoop.finalize`).

Callbacks get what ``fit`` gives them (``keras.callbacks.CallbackList`` with
History and, when verbose, the progress bar): ``on_train_begin``,
``on_epoch_begin``, ``on_train_batch_begin/end`` (once per execution of
``steps_per_execution`` steps, with the running logs), ``on_test_begin/end``
around validation, ``on_epoch_end`` with ``val_``-prefixed validation logs, and
``model.stop_training`` is honoured after every execution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from pneumo_models import distribute

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


class LoopError(ValueError):
    """The loop cannot run with these inputs; the message says why."""


def default_metrics() -> list[keras.metrics.Metric]:
    """The training job's metrics (same names as its history.csv columns)."""
    return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")]


@dataclasses.dataclass(frozen=True)
class EvalInput:
    """A finite evaluation set spread over the replicas; build it with
    :meth:`TrainingLoop.eval_input`."""

    dataset_fn: DatasetFn
    num_examples: int
    per_replica_batch: int
    shares: Callable[[int], Sequence[int]] | None = None

    def largest_share(self, pipelines: int) -> int:
        """The most examples one of ``pipelines`` input pipelines holds."""
        if self.shares is None:
            return math.ceil(self.num_examples / pipelines)
        shares = [int(n) for n in self.shares(pipelines)]
        if len(shares) != pipelines or sum(shares) != self.num_examples:
            raise LoopError(f"shares({pipelines}) gave {shares}: expected {pipelines} counts "
                            f"adding up to {self.num_examples}")
        return max(shares)


def _record(strategy, metrics, weighted: bool, outputs) -> None:
    """Adds one step's per-replica (loss, labels, probabilities, weights) to the training
    metrics: the loss summed over the replicas, the rest gathered."""
    loss, y, p, w = outputs
    loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
    y, p = strategy.gather(y, axis=0), strategy.gather(p, axis=0)
    w = strategy.gather(w, axis=0) if weighted else None
    metrics[0].update_state(loss)
    for metric in metrics[1:]:
        metric.update_state(y, p, sample_weight=w)


class TrainingLoop:
    """Trains and evaluates a Keras model under ``strategy``.

    Args:
      model: built (or loaded) inside ``strategy.scope()``.
      strategy: from :func:`pneumo_models.distribute.make_strategy`.
      optimizer: created inside ``strategy.scope()`` (learning-rate schedules, weight
        decay and so on are the optimizer's business); default ``model.optimizer``.
        When the model is compiled it must be compiled with this optimizer, so that a
        saved model keeps the optimizer state, as with ``fit``; when ``compile`` wrapped
        it in a ``LossScaleOptimizer`` (Keras does under ``mixed_float16``) the loop uses
        the wrapper, which scales the loss.
      loss: a ``keras.losses.Loss`` (its per-example ``call`` is used, so options such
        as ``label_smoothing`` apply) or a function ``(y, p) -> [B]``; default
        ``model.loss``, else binary cross-entropy. Compiled metrics are not used.
      class_weight: optional ``{class index: weight}``, as in ``fit``.
      metrics: a callable returning fresh metrics (default :func:`default_metrics`);
        called twice (training and validation copies).
      steps_per_execution: training steps per ``tf.function`` call (callbacks
        see one batch end per call).
      jit_compile: XLA-compile the replica step.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy, *,
                 optimizer: keras.optimizers.Optimizer | None = None,
                 loss: keras.losses.Loss | Callable | None = None,
                 class_weight: Mapping[int, float] | None = None,
                 metrics: Callable[[], Sequence[keras.metrics.Metric]] | None = None,
                 steps_per_execution: int = 1, jit_compile: bool = False):
        if not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise LoopError(f"steps_per_execution must be a positive integer, got "
                            f"{steps_per_execution!r}")
        compiled = getattr(model, "optimizer", None)
        optimizer = optimizer if optimizer is not None else compiled
        if optimizer is not None and compiled is not None and optimizer is not compiled and \
                getattr(compiled, "inner_optimizer", None) is not optimizer:
            raise LoopError("the model is compiled with another optimizer than the loop's; "
                            "compile it with the loop's optimizer so saved models keep its "
                            "state")
        if compiled is not None and getattr(compiled, "inner_optimizer", None) is optimizer:
            optimizer = compiled  # the LossScaleOptimizer Keras wrapped it in (mixed_float16)
        loss = loss if loss is not None else getattr(model, "loss", None)
        if loss is None:
            loss = keras.losses.BinaryCrossentropy()
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        if not callable(loss):
            raise LoopError(f"loss must be a keras.losses.Loss or a function (y, p) -> [B], "
                            f"got {loss!r}")
        probe = _per_example(loss, tf.zeros([2, 1]), tf.fill([2, 1], 0.5))
        if probe.shape.rank == 0 or probe.shape.num_elements() != 2:
            raise LoopError(f"the loss returned shape {probe.shape.as_list()} for a batch of 2; "
                            f"the loop needs one value per example (a keras.losses.Loss, or "
                            f"fn(y, p) -> [B])")
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        for opt in (optimizer, inner) if optimizer is not None else ():
            if getattr(opt, "_distribution_strategy", strategy) is not strategy:
                raise LoopError("the model's optimizer was created outside this strategy's "
                                "scope; compile the model inside strategy.scope()")
        if model.trainable_variables and not strategy.extended.variable_created_in_scope(
                model.trainable_variables[0].value):
            raise LoopError("the model's variables were created outside this strategy's scope; "
                            "build (or load) the model inside strategy.scope()")
        self.model, self.strategy, self.optimizer = model, strategy, optimizer
        self.loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.steps_per_execution = steps_per_execution
        self.jit_compile = jit_compile
        self.class_weight = _class_weight_table(class_weight)
        self.loss = loss
        make = metrics or default_metrics
        self.train_metrics = [keras.metrics.Mean(name="loss"), *make()]
        self.val_metrics = [keras.metrics.Mean(name="loss"), *make()]
        self._val_count = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                      name="val_examples")
        if optimizer is not None and not optimizer.built:
            with strategy.scope():
                optimizer.build(model.trainable_variables)
        self._train_function = None
        self._eval_function = None
        self._eval_datasets: dict[int, tuple] = {}

    # ------------------------------------------------------------ inputs

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def eval_input(self, dataset_fn: DatasetFn, *, num_examples: int, batch_size: int,
                   shares: Callable[[int], Sequence[int]] | None = None) -> EvalInput:
        """A padded, exactly-once evaluation input.

        Args:
          dataset_fn: ``InputContext -> dataset of (x, y) batches`` (any batch size,
            batches may be short) holding this input pipeline's share of the set, each
            example once (``pneumo_data.eval_dataset(..., input_context=ctx)`` does this).
          num_examples: size of the whole set.
          batch_size: global batch (divisible by the replicas).
          shares: ``P -> [examples of pipeline 0, ..., pipeline P-1]``; default: pipeline
            ``i`` holds the examples ``i, i + P, i + 2P, ...``.
        """
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise LoopError(f"num_examples must be a positive integer, got {num_examples!r}")
        per_replica = distribute.per_replica_batch_size(batch_size, self.strategy)
        return EvalInput(dataset_fn, num_examples, per_replica, shares)

    def _eval_dataset(self, validation: EvalInput):
        """The distributed padded dataset of ``validation`` and its global steps per pass."""
        key = id(validation)
        if key not in self._eval_datasets:
            fn, info = _padded_eval_fn(validation)
            dataset = self.strategy.distribute_datasets_from_function(fn)
            if "steps" not in info:  # the function runs when the dataset is distributed
                raise LoopError("the evaluation dataset function was not called")
            self._eval_datasets[key] = (validation, dataset, info["steps"])
        return self._eval_datasets[key][1:]

    # ------------------------------------------------------------ steps

    def _per_example_loss(self, y, p):
        return tf.reshape(_per_example(self.loss, y, p), [-1])

    def _weights(self, y):
        if self.class_weight is None:
            return tf.ones([tf.shape(y)[0]], tf.float32)
        index = tf.cast(tf.reshape(y, [-1]), tf.int32)
        return tf.gather(self.class_weight, index)

    def _replica_train_step(self, x, y):
        model, optimizer = self.model, self.optimizer
        global_batch = tf.cast(tf.shape(y)[0] * self.replicas, tf.float32)
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            weights = self._weights(y)
            per_example = self._per_example_loss(y, p)
            loss = tf.reduce_sum(per_example * weights) / global_batch
            if model.losses:
                loss += tf.add_n([tf.cast(v, tf.float32) for v in model.losses]) / self.replicas
            scaled = optimizer.scale_loss(loss) if self.loss_scaling else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.loss_scaling and self.replicas > 1:
            grads = _agree_on_finiteness(grads, self.replicas)
        optimizer.apply(grads, variables)
        return loss, tf.cast(y, tf.float32), tf.cast(p, tf.float32), weights

    def _replica_eval_step(self, x, y, w):
        p = self.model(x, training=False)
        per_example = self._per_example_loss(y, p)
        if self.model.losses:
            per_example += tf.add_n([tf.cast(v, tf.float32) for v in self.model.losses])
        return tf.cast(y, tf.float32), tf.cast(p, tf.float32), tf.cast(w, tf.float32), per_example

    def _make_train_function(self):
        replica_step = tf.function(self._replica_train_step, jit_compile=self.jit_compile,
                                   reduce_retracing=True)
        strategy, metrics = self.strategy, self.train_metrics
        weighted = self.class_weight is not None

        def one_step(x, y):
            _record(strategy, metrics, weighted, strategy.run(replica_step, args=(x, y)))

        @tf.function
        def train_function(iterator, steps):
            for _ in tf.range(steps):
                x, y = next(iterator)
                one_step(x, y)
            return {m.name: m.result() for m in metrics}  # in the graph: one call per execution

        return train_function

    def _make_resident_train_function(self, source):
        """The train function for a device-resident set: each replica draws its share of the
        step's batch inside the step (``source.next_batch()``), nothing comes from the host."""
        strategy, metrics = self.strategy, self.train_metrics
        weighted = self.class_weight is not None

        # one function per replica, the draw in it, handed to strategy.run as the stream's
        # step is (a plain function calling a nested one would put the optimizer's
        # cross-replica merge inside the nested function, which MirroredStrategy refuses)
        replica = tf.function(lambda: self._replica_train_step(*source.next_batch()),
                              jit_compile=self.jit_compile, reduce_retracing=True)

        @tf.function
        def train_function(steps):
            for _ in tf.range(steps):
                _record(strategy, metrics, weighted, strategy.run(replica))
            return {m.name: m.result() for m in metrics}

        return train_function

    def _make_eval_function(self):
        replica_step = tf.function(self._replica_eval_step, jit_compile=self.jit_compile,
                                   reduce_retracing=True)
        strategy, metrics, count = self.strategy, self.val_metrics, self._val_count

        def one_step(x, y, w):
            y, p, w, per_example = strategy.run(replica_step, args=(x, y, w))
            y, p, w, per_example = (strategy.gather(t, axis=0) for t in (y, p, w, per_example))
            metrics[0].update_state(per_example, sample_weight=w)
            for metric in metrics[1:]:
                metric.update_state(y, p, sample_weight=w)
            count.assign_add(tf.reduce_sum(tf.cast(w, tf.float64)))

        @tf.function
        def eval_function(iterator, steps):
            for _ in tf.range(steps):
                x, y, w = next(iterator)
                one_step(x, y, w)
            return {m.name: m.result() for m in metrics}

        return eval_function

    # ------------------------------------------------------------ fit / evaluate

    def fit(self, train_dataset_fn: DatasetFn, *, batch_size: int, steps_per_epoch: int,
            epochs: int,
            initial_epoch: int = 0, validation: EvalInput | None = None,
            callbacks: Sequence[keras.callbacks.Callback] | keras.callbacks.CallbackList = (),
            verbose: int = 0) -> keras.callbacks.History:
        """Epochs ``initial_epoch .. epochs-1`` of ``steps_per_epoch`` global steps each.

        Args:
          train_dataset_fn: ``InputContext -> infinite dataset of per-replica
            (x, y) batches`` (``pneumo_data.train_dataset(..., input_context=ctx)``), or a
            device-resident set (:class:`pneumo_data.resident.ResidentTrainSet`, anything
            with ``next_batch()`` and ``per_replica``) drawn inside the step.
        Returns the History callback, as ``fit`` does.
        """
        if self.optimizer is None:
            raise LoopError("fit needs an optimizer: give the loop one, or compile the model "
                            "with one (inside strategy.scope())")
        if steps_per_epoch <= 0 or epochs < 0 or initial_epoch < 0:
            raise LoopError(f"steps_per_epoch must be positive and epochs, initial_epoch >= 0; "
                            f"got {steps_per_epoch}, {epochs}, {initial_epoch}")
        if hasattr(train_dataset_fn, "next_batch"):
            run_steps = self._resident_steps(train_dataset_fn, batch_size)
        else:
            dataset = self.strategy.distribute_datasets_from_function(
                self._checked_train_fn(train_dataset_fn, batch_size))
            iterator = iter(dataset)
            if self._train_function is None:
                self._train_function = self._make_train_function()

            def run_steps(count):
                return self._train_function(iterator, tf.constant(count))
        model = self.model
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = keras.callbacks.CallbackList(
                list(callbacks), add_history=True, add_progbar=verbose != 0, model=model,
                verbose=verbose, epochs=epochs, steps=steps_per_epoch)
        model.stop_training = False
        callbacks.on_train_begin()
        epoch_logs: dict[str, float] = {}
        for epoch in range(initial_epoch, epochs):
            for metric in self.train_metrics:
                metric.reset_state()
            callbacks.on_epoch_begin(epoch)
            logs: dict[str, float] = {}
            step = 0
            while step < steps_per_epoch:
                count = min(self.steps_per_execution, steps_per_epoch - step)
                callbacks.on_train_batch_begin(step)
                logs = _floats(run_steps(count))
                step += count
                callbacks.on_train_batch_end(step - 1, logs)
                if model.stop_training:
                    break
            epoch_logs = dict(logs)
            if validation is not None:
                val_logs = self.evaluate(validation, callbacks=callbacks)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callbacks.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        self.finalize()
        callbacks.on_train_end(logs=epoch_logs)
        return model.history

    def finalize(self) -> None:
        """What ``fit`` does at its end, as Keras's ``fit`` does: the optimizer's
        ``finalize_variable_values``, which with a weight average (``use_ema``) writes the
        average into the model's trainable weights. Only once the optimizer has taken a step
        (its average is empty before); a run resumed after its last epoch calls it with the
        optimizer state it loaded. A no-op without an average."""
        optimizer = self.optimizer
        if optimizer is not None and int(optimizer.iterations.numpy()) > 0:
            optimizer.finalize_variable_values(self.model.trainable_variables)

    def evaluate(self, validation: EvalInput,
                 callbacks: keras.callbacks.CallbackList | None = None) -> dict[str, float]:
        """One pass over ``validation``; returns ``{"loss": ..., metric: ...}``."""
        if self._eval_function is None:
            self._eval_function = self._make_eval_function()
        dataset, steps = self._eval_dataset(validation)
        for metric in self.val_metrics:
            metric.reset_state()
        self._val_count.assign(0.0)
        if callbacks is not None:
            callbacks.on_test_begin()
        iterator = iter(dataset)
        done = 0
        logs: dict[str, float] = {}
        while done < steps:
            count = min(self.steps_per_execution, steps - done)
            if callbacks is not None:
                callbacks.on_test_batch_begin(done)
            logs = _floats(self._eval_function(iterator, tf.constant(count)))
            done += count
            if callbacks is not None:
                callbacks.on_test_batch_end(done - 1, logs)
        seen = int(round(float(self._val_count.numpy())))
        if seen != validation.num_examples:
            raise LoopError(
                f"validation counted {seen} examples, expected {validation.num_examples}: the "
                f"dataset_fn must yield its input pipeline's share, each example once (by "
                f"default examples i, i+P, ... of pipeline i of P); did it shard by its "
                f"InputContext?")
        if callbacks is not None:
            callbacks.on_test_end(logs)
        return logs

    def _resident_steps(self, source, batch_size: int):
        per_replica = distribute.per_replica_batch_size(batch_size, self.strategy)
        if source.per_replica != per_replica or source.strategy is not self.strategy:
            raise LoopError(f"the resident set draws {source.per_replica} images per replica "
                            f"under another strategy or batch; the loop needs {per_replica} "
                            f"(the global batch {batch_size} / replicas) under its own")
        functions = self.__dict__.setdefault("_resident_functions", {})
        if id(source) not in functions:
            functions[id(source)] = (source, self._make_resident_train_function(source))
        function = functions[id(source)][1]
        return lambda count: function(tf.constant(count))

    def _checked_train_fn(self, fn: DatasetFn, batch_size: int) -> DatasetFn:
        per_replica = distribute.per_replica_batch_size(batch_size, self.strategy)

        def checked(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            dataset = fn(ctx)
            spec = dataset.element_spec
            if not isinstance(spec, tuple) or len(spec) != 2:
                raise LoopError(f"the training dataset must yield (x, y) batches, got {spec}")
            batch = spec[1].shape[0] if spec[1].shape.rank else None
            if batch != per_replica:
                raise LoopError(
                    f"the training dataset yields batches of {batch}; each of the "
                    f"{ctx.num_replicas_in_sync} replicas needs {per_replica} (the global batch "
                    f"{batch_size} / replicas), static (drop_remainder=True). Build it with "
                    f"ctx.get_per_replica_batch_size({batch_size}).")
            return dataset

        return checked


# ---------------------------------------------------------------- helpers

def _per_example(loss, y, p):
    """The loss of each example, float32 (a Keras Loss's unreduced ``call``)."""
    y, p = tf.cast(y, tf.float32), tf.cast(p, tf.float32)
    fn = loss.call if isinstance(loss, keras.losses.Loss) else loss
    return tf.cast(tf.convert_to_tensor(fn(y, p)), tf.float32)


def _floats(results: Mapping[str, tf.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in results.items()}


def _class_weight_table(class_weight: Mapping[int, float] | None):
    if class_weight is None:
        return None
    if not class_weight:
        raise LoopError("class_weight must not be empty")
    keys = sorted(class_weight)
    if keys != list(range(len(keys))):
        raise LoopError(f"class_weight keys must be 0..K-1, got {keys}")
    values = [float(class_weight[k]) for k in keys]
    if any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise LoopError(f"class weights must be finite and >= 0, got {values}")
    return tf.constant(values, tf.float32)


def _agree_on_finiteness(grads, replicas: int):
    """Gives every replica non-finite gradients when any replica has them (so a loss-scale
    optimizer skips the step on all replicas together)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
    bad = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    nan = tf.constant(float("nan"))
    return tf.cond(bad > 0,
                   lambda: [None if g is None else g * tf.cast(nan, g.dtype) for g in grads],
                   lambda: list(grads))


def _padded_eval_fn(validation: EvalInput) -> tuple[DatasetFn, dict[str, int]]:
    """Wraps ``validation.dataset_fn``: unbatch, weight 1, pad with weight-0 examples to the
    same number of full per-replica batches on every pipeline, batch. The second value
    receives ``steps`` (global steps per pass) when the function runs."""
    batch = validation.per_replica_batch
    info: dict[str, int] = {}

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        pipelines, replicas = ctx.num_input_pipelines, ctx.num_replicas_in_sync
        local_replicas = replicas // pipelines
        largest_share = validation.largest_share(pipelines)
        steps = max(1, math.ceil(largest_share / (batch * local_replicas)))
        info["steps"] = steps
        dataset = validation.dataset_fn(ctx)
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise LoopError(f"the evaluation dataset must yield (x, y) batches, got {spec}")
        x_spec, y_spec = spec[0], spec[1]
        for name, s in (("x", x_spec), ("y", y_spec)):
            if s.shape.rank is None or not s.shape[1:].is_fully_defined():
                raise LoopError(f"the evaluation dataset's {name} needs a static shape after "
                                f"the batch dimension, got {s.shape}")
        dataset = dataset.map(lambda x, y, *rest: (x, y)).unbatch()
        dataset = dataset.map(lambda x, y: (x, y, tf.constant(1.0)))
        pad = tf.data.Dataset.from_tensors(
            (tf.zeros(x_spec.shape[1:], x_spec.dtype), tf.zeros(y_spec.shape[1:], y_spec.dtype),
             tf.constant(0.0))).repeat()
        dataset = dataset.concatenate(pad).take(steps * local_replicas * batch)
        return dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    return fn, info
