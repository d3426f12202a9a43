"""A class-balanced batch of indices per step, stateless apart from one counter per class.

The stream and the device-resident training set (:mod:`pneumo_data.resident`) both draw
their batches here, so they share one definition of balance and epoch accounting:

* every element of a batch picks its class independently with the target weights (what
  ``sample_from_datasets`` does element by element);
* each class is walked through a permutation of its images, one pass after the other, a
  new permutation every pass (what ``shuffle(N, reshuffle_each_iteration=True).repeat()``
  does), so every image of a class appears exactly once per pass of that class.

A pass's permutation is a keyed Feistel network over ``[0, 2^k)`` with cycle walking down
to ``[0, N)``: a bijection computed element by element (no permutation is ever
materialized), keyed by (seed, class, pass). The only state is how many images each class
has handed out so far ([C] int64): a ``Dataset.scan`` carries it in the stream, a variable
on the device carries it in the resident set. Everything is plain TensorFlow ops on
vectors of the batch size, so it runs on a CPU, a GPU or inside XLA.

::

    sampler = BalancedSampler(counts=[1341, 3875], weights=[0.5, 0.5], seed=0)
    state = sampler.initial_state()
    index, label, state = sampler.draw(state, step=0, batch_size=32)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf

_MASK32 = 0xFFFFFFFF
STEPS_PER_DRAW = 16  # batches of row indices per draw of the stream and the resident set
_ROUNDS = 4


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 values below 2^32;
    products stay below 2^59, so int64 never overflows."""
    x = tf.bitwise.bitwise_and(x, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x045D9F3B, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x045D9F3B, _MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def permute(i: tf.Tensor, n: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Element ``i`` (int64, each in ``[0, n)``) of a keyed pseudo-random permutation of
    ``[0, n)``; ``key`` (int64, broadcast with ``i``) picks the permutation. A bijection
    for every key: a balanced Feistel network on ``2h`` bits (``4^h >= n``), walked again
    while the result is ``>= n`` (at most 4 expected walks)."""
    i = tf.cast(i, tf.int64)
    n = tf.cast(n, tf.int64)
    key = tf.cast(key, tf.int64)
    bits = tf.cast(tf.math.ceil(tf.math.log(tf.cast(tf.maximum(n, 4), tf.float64))
                                / math.log(4.0) - 1e-9), tf.int64)
    half_mask = tf.bitwise.left_shift(tf.constant(1, tf.int64), bits) - 1

    def feistel(x):
        left = tf.bitwise.right_shift(x, bits)
        right = tf.bitwise.bitwise_and(x, half_mask)
        for r in range(_ROUNDS):
            f = tf.bitwise.bitwise_and(_mix(right + _mix(key * 4 + r)), half_mask)
            left, right = right, tf.bitwise.bitwise_xor(left, f)
        return tf.bitwise.bitwise_or(tf.bitwise.left_shift(left, bits), right)

    x = feistel(i)
    # Cycle walking: the walk from i stays in i's cycle and leaves [n, 4^h) within it,
    # so the map stays a bijection of [0, n).
    x = tf.while_loop(lambda x: tf.reduce_any(x >= n),
                      lambda x: (tf.where(x >= n, feistel(x), x),), (x,))[0]
    return x


@dataclasses.dataclass(frozen=True)
class BalancedSampler:
    """Class-balanced index batches over a set laid out class by class.

    Args:
      counts: images per class, in the order they are stored (class ``c``'s images are
        rows ``offset_c .. offset_c + counts[c] - 1`` of the set).
      weights: target class mix (normalized here); a class of weight 0 is never drawn.
      seed: seeds the class draws and the permutations (None: 0).
      labels: the label each class's images carry (default: the class position).
    """

    counts: Sequence[int]
    weights: Sequence[float]
    seed: int | None = 0
    labels: Sequence[float] | None = None

    def __post_init__(self):
        if len(self.counts) != len(self.weights) or not self.counts:
            raise ValueError("counts and weights must have one entry per class")
        if any(w > 0 and c <= 0 for c, w in zip(self.counts, self.weights)):
            raise ValueError(f"a class with weight above 0 has no images: {self.counts}")
        if sum(self.weights) <= 0:
            raise ValueError("weights must not all be zero")

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            out.append(total)
            total += int(c)
        return out

    def initial_state(self) -> tf.Tensor:
        """Images handed out per class so far: zeros [C] int64."""
        return tf.zeros([len(self.counts)], tf.int64)

    def draw(self, state: tf.Tensor, step, batch_size: int, steps: int | None = None):
        """The batch of step ``step``: (row indices [B] int64, labels [B] float32, state').

        ``state`` is the per-class count before this step; the class draws depend on
        (seed, step) only, the rows also on ``state``. Equal arguments give equal batches.
        With ``steps=K`` it draws K batches at once ([K, B] rows and labels; ``step``
        then numbers the chunk): the same distribution for a K-th of the op overhead.
        """
        if steps is not None:
            rows, labels, state = self.draw(state, step, batch_size * steps)
            return (tf.reshape(rows, [steps, batch_size]),
                    tf.reshape(labels, [steps, batch_size]), state)
        classes = len(self.counts)
        total = float(sum(self.weights))
        edges, acc = [], 0.0
        for w in self.weights[:-1]:
            acc += w / total
            edges.append(acc)
        seed = tf.stack([tf.constant(self.seed or 0, tf.int64),
                         tf.cast(step, tf.int64)])
        # (stateless_categorical has no XLA kernel: a uniform against the cumulative weights)
        u = tf.random.stateless_uniform([batch_size], seed, dtype=tf.float32)
        choice = tf.reduce_sum(tf.cast(u[:, None] >= tf.constant(edges + [2.0])[None],
                                       tf.int32), axis=1)                         # [B]
        onehot = tf.one_hot(choice, classes, dtype=tf.int64)                      # [B, C]
        rank = tf.reduce_sum((tf.cumsum(onehot, axis=0, exclusive=True)) * onehot, axis=1)
        state = tf.cast(state, tf.int64)
        position = tf.gather(state, choice) + rank                                # [B]
        n = tf.gather(tf.constant([max(1, int(c)) for c in self.counts], tf.int64), choice)
        passes = position // n
        key = _mix(_mix(tf.cast(choice, tf.int64) * 0x9E3779B1 + (self.seed or 0))
                   + passes * 0x85EBCA6B)
        within = permute(position - passes * n, n, key)
        rows = tf.gather(tf.constant(self.offsets, tf.int64), choice) + within
        label_values = self.labels if self.labels is not None else list(range(classes))
        labels = tf.gather(tf.constant([float(v) for v in label_values], tf.float32), choice)
        return rows, labels, state + tf.reduce_sum(onehot, axis=0)
