"""The Fisher under `tf.distribute`: per-replica partial sums, all-reduced.

Every Fisher estimator but `batched` is a sum over examples of squared per-example
gradients, divided by the number of examples. Under a strategy with several replicas
(`MirroredStrategy` on several devices, `MultiWorkerMirroredStrategy` on several
processes) each global batch is split into one contiguous shard a replica, each replica
computes the partial sums on its shard with the engine's function, and the partial sums
are all-reduced (SUM). The caller divides by the GLOBAL number of examples and assigns
the state in cross-replica context, where mirrored variables may be assigned.

Shards are as even as possible (sizes differ by at most one); a replica whose shard is
empty (a last batch smaller than the number of replicas) contributes zeros, so a
ragged last batch gives the same Fisher as on one device.

Every worker of a multi-worker strategy must iterate over the same global batches (the
same data, in the same order): each takes its own replicas' shards of every batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

from keras_ewc._tensorflow import tf


def replicas_in_sync() -> int:
    """The replicas of the strategy in scope (1 outside any): Keras divides each
    replica's loss by it, and the penalty must be divided the same way."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def is_distributed(strategy) -> bool:
    """Whether `strategy` spreads the work over more than one replica."""
    return strategy is not None and strategy.num_replicas_in_sync > 1


def shard_bounds(size: int, replicas: int, replica: int) -> tuple[int, int]:
    """`[start, stop)` of replica `replica`'s contiguous shard of a batch of `size`.

    The first `size % replicas` replicas take one example more than the others.

    >>> [shard_bounds(5, 2, r) for r in range(2)]
    [(0, 3), (3, 5)]
    >>> [shard_bounds(1, 2, r) for r in range(2)]
    [(0, 1), (1, 1)]
    """
    base, extra = divmod(int(size), int(replicas))
    start = replica * base + min(replica, extra)
    return start, start + base + (1 if replica < extra else 0)


def distribute_sum_fn(
    strategy: tf.distribute.Strategy,
    sum_fn: Callable,
    variables: Sequence[tf.Variable],
) -> Callable:
    """Wraps the engine's `sum_fn(inputs, extra)` to run shard by shard on `strategy`.

    The returned function has the same contract as `sum_fn` — a global batch in, the
    per-variable sums of squared per-example gradients over the whole batch out — but
    each replica computes the sums on its shard (`strategy.run`), and the partial sums
    are all-reduced with `ReduceOp.SUM`. Call it in cross-replica context (eagerly,
    outside `strategy.run`).

    Args:
        strategy: the `tf.distribute.Strategy` whose replicas share the work.
        sum_fn: the engine's function for one batch
            (`keras_ewc.fisher.engine.build_sum_squared_grads`).
        variables: the variables `sum_fn` differentiates, for the shapes of the zeros
            an empty shard contributes.
    """
    shapes = [tuple(v.shape) for v in variables]
    replicas = strategy.num_replicas_in_sync

    def replica_fn(inputs, extra):
        # Called eagerly, once a replica, with the shard itself: its batch size is
        # static, as per-layer kernels may need, and an empty shard adds zeros.
        if int(tf.shape(tf.nest.flatten(inputs)[0])[0]) == 0:
            return [tf.zeros(shape, tf.float32) for shape in shapes]
        return [tf.cast(s, tf.float32) for s in sum_fn(inputs, extra)]

    def step(inputs, extra):
        # Not wrapped in a tf.function: its signature would merge the uneven shards'
        # shapes into an unknown batch size. `sum_fn` itself is compiled.
        partial = strategy.run(replica_fn, args=(inputs, extra))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, p, axis=None) for p in partial]

    def split(values, size):
        if values is None:
            return None

        def value_fn(context):
            start, stop = shard_bounds(size, replicas, context.replica_id_in_sync_group)
            return tf.nest.map_structure(lambda t: t[start:stop], values)

        return strategy.experimental_distribute_values_from_function(value_fn)

    def fn(inputs, extra):
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        if extra is not None:
            extra = tf.nest.map_structure(tf.convert_to_tensor, extra)
        size = int(tf.shape(tf.nest.flatten(inputs)[0])[0])
        return step(split(inputs, size), split(extra, size))

    return fn


def first_local_batch(strategy, iterator):
    """The first batch of a Keras epoch iterator, as this process's first replica sees it.

    Used by `EWCModel` to build its optimizer and metrics before `fit`: only the shapes
    matter, and unlike `strategy.reduce` this works on every strategy (Keras' own path
    fails on `MultiWorkerMirroredStrategy` for `(x, y)` batches). Returns None when
    the iterator yields nothing.
    """
    for _, _, it in iterator:
        batch = next(it)
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v,
            batch,
        )
    return None


def logs_for_reduction(strategy, logs):
    """Makes a step's scalar logs reducible by Keras under multi-worker strategies.

    Keras (3.15) reduces each replica's logs with `strategy.reduce("MEAN", v, axis=0)`
    under `MultiWorkerMirroredStrategy`, which fails on scalars ("Invalid reduction
    dimension 0"). Giving each scalar the shape `[1]` makes that reduction the plain
    mean over replicas, a scalar again. Other strategies get the logs unchanged.
    """
    from keras_ewc import _private  # Keras' own test for this strategy

    if not _private.is_multi_worker(strategy):
        return logs
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, logs
    )
