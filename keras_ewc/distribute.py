"""The Fisher under `tf.distribute`: moved to `keras_ewc.backend.tensorflow.distribute`
(TensorFlow's by nature); this module keeps the old import path working."""

from keras_ewc.backend.tensorflow.distribute import (  # noqa: F401
    distribute_sum_fn,
    first_local_batch,
    is_distributed,
    logs_for_reduction,
    replicas_in_sync,
    shard_bounds,
)
