"""fisher_diagonal against brute-force oracles (one example at a time, own tape).

Tolerance: relative 1e-5 of each entry, plus 1e-11 of the tensor's largest entry for
entries that are float32 round-off away from zero.
"""

import re

import keras
import numpy as np
import oracle
import pytest
import tensorflow as tf

from keras_ewc import fisher_diagonal
from keras_ewc.fisher import likelihoods


class Subclassed(keras.Model):
    def __init__(self, classes=4):
        super().__init__()
        self.hidden = keras.layers.Dense(6, activation="tanh")
        self.out = keras.layers.Dense(classes)

    def call(self, x, training=False):
        return self.out(self.hidden(x) * 1.5)


def dense_model(classes=4, activation=None):
    return keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
        keras.layers.Dense(classes, activation=activation)])


def conv_model(classes=3):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, strides=1, activation="relu"),
        keras.layers.Conv2D(2, 2, strides=2, padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(classes)])


def built_subclassed():
    model = Subclassed()
    model(np.zeros((1, 5), "float32"))
    return model


def _data(model, n=13, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) + tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else (n, 5)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, classes, n)
    return x, y


MODELS = {"dense": (dense_model, 4), "conv": (conv_model, 3), "subclassed": (built_subclassed, 4)}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_categorical_matches_oracle(name):
    build, classes = MODELS[name]
    model = build()
    x, _ = _data(model, classes=classes)
    fisher = fisher_diagonal(model, x, likelihood="categorical", batch_size=5, verbose=0)
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("name", list(MODELS))
def test_empirical_matches_oracle(name):
    build, classes = MODELS[name]
    model = build()
    x, y = _data(model, classes=classes)
    fisher = fisher_diagonal(model, (x, y), estimator="empirical", likelihood="categorical",
                             batch_size=4, verbose=0)
    expected = oracle.categorical_labels(model, model.trainable_variables, x, y)
    oracle.assert_close(fisher, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_sampled_matches_oracle_on_the_drawn_labels(name):
    build, classes = MODELS[name]
    model = build()
    x, _ = _data(model, classes=classes)
    fisher = fisher_diagonal(model, x, estimator="sampled", samples=3, seed=11,
                             likelihood="categorical", batch_size=8, verbose=0)
    # The labels the estimator drew: its documented noise, batch by batch.
    lik = likelihoods.Categorical(from_logits=True)
    labels = []
    for index, start in enumerate(range(0, len(x), 8)):
        xb = x[start:start + 8]
        noise = tf.random.stateless_uniform([len(xb), 3, classes], seed=[11, index])
        labels.append(lik.sample(model(xb, training=False), noise).numpy())
    labels = np.concatenate(labels)
    expected = oracle.categorical_labels(model, model.trainable_variables, x, labels)
    oracle.assert_close(fisher, expected)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_matches_squared_batch_gradients(name):
    build, classes = MODELS[name]
    model = build()
    x, y = _data(model, classes=classes)
    fisher = fisher_diagonal(model, (x, y), estimator="batched", likelihood="categorical",
                             batch_size=5, verbose=0)
    expected = oracle.batched(model, model.trainable_variables, x, y, 5)
    oracle.assert_close(fisher, expected)


def test_sampled_is_seeded_and_converges_to_exact():
    model = dense_model()
    x, _ = _data(model, n=6)
    a = fisher_diagonal(model, x, estimator="sampled", seed=3, likelihood="categorical", verbose=0)
    b = fisher_diagonal(model, x, estimator="sampled", seed=3, likelihood="categorical", verbose=0)
    c = fisher_diagonal(model, x, estimator="sampled", seed=4, likelihood="categorical", verbose=0)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.allclose(a[0].numpy(), c[0].numpy())
    # 24,000 draws an example: the 6 examples repeated 3,000 times, 8 labels each.
    many = fisher_diagonal(model, np.tile(x, (3000, 1)), estimator="sampled", samples=8,
                           seed=5, likelihood="categorical", batch_size=2000, verbose=0)
    exact = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    for m, e in zip(many, exact):
        # Monte Carlo: a few percent of the total mass.
        assert np.abs(m - e).sum() < 0.05 * np.abs(e).sum()


def test_probability_outputs_and_one_hot_labels():
    model = dense_model(activation="softmax")
    x, y = _data(model)
    exact = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    expected = oracle.categorical_exact(model, model.trainable_variables, x, from_logits=False)
    oracle.assert_close(exact, expected)
    one_hot = np.eye(4, dtype="float32")[y]
    emp = fisher_diagonal(model, (x, one_hot), estimator="empirical", likelihood="categorical",
                          verbose=0)
    expected = oracle.categorical_labels(model, model.trainable_variables, x, y,
                                         from_logits=False)
    oracle.assert_close(emp, expected)


def test_likelihood_is_inferred_from_the_compiled_loss():
    model = dense_model(activation="softmax")
    x, _ = _data(model)
    model.compile("sgd", "sparse_categorical_crossentropy")
    inferred = fisher_diagonal(model, x, verbose=0)
    expected = oracle.categorical_exact(model, model.trainable_variables, x, from_logits=False)
    oracle.assert_close(inferred, expected)


def test_bernoulli_exact_matches_enumeration_of_all_label_vectors():
    model = dense_model(classes=3)
    x, _ = _data(model, n=7)
    fisher = fisher_diagonal(model, x, likelihood=likelihoods.Bernoulli(from_logits=True),
                             verbose=0)
    oracle.assert_close(fisher, oracle.bernoulli_exact(model, model.trainable_variables, x))
    # Probability outputs give the same Fisher as the logits that produce them.
    probs = keras.Sequential([model, keras.layers.Activation("sigmoid")])
    again = fisher_diagonal(probs, x, likelihood=likelihoods.Bernoulli(from_logits=False),
                            verbose=0)
    oracle.assert_close(again, oracle.bernoulli_exact(model, model.trainable_variables, x),
                        rtol=1e-4)


def test_gaussian_exact_matches_oracle_and_monte_carlo():
    model = dense_model(classes=2)
    x, _ = _data(model, n=5)
    fisher = fisher_diagonal(model, x, likelihood="gaussian", verbose=0)
    oracle.assert_close(fisher, oracle.gaussian_exact(model, model.trainable_variables, x))
    sampled = fisher_diagonal(model, np.tile(x, (600, 1)), estimator="sampled", samples=5,
                              seed=0, likelihood="gaussian", batch_size=600, verbose=0)
    for s, e in zip(sampled, fisher):
        assert np.abs(s - e).sum() < 0.06 * np.abs(e).sum()


def test_dataset_input_and_rebatching_give_the_same_fisher():
    model = dense_model()
    x, y = _data(model, n=10)
    from_arrays = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    from_ds = fisher_diagonal(model, ds, likelihood="categorical", verbose=0)
    rebatched = fisher_diagonal(model, ds, likelihood="categorical", batch_size=4, verbose=0)
    for a, b, c in zip(from_arrays, from_ds, rebatched):
        np.testing.assert_allclose(a, b, rtol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5)


def test_array_batches_are_the_batches_of_tf_data():
    # What the loop reads on JAX in place of tf.data: the same slices in the same order,
    # a smaller last batch, `steps` batches at most, for a dict and a tuple nest.
    from keras_ewc.fisher.diagonal import ArrayBatches

    rng = np.random.default_rng(0)
    data = ({"a": rng.normal(size=(11, 3)), "b": np.arange(11)}, rng.normal(size=(11,)))
    for steps in (None, 2, 9):
        ours = list(ArrayBatches(data, 4, steps))
        theirs = list(tf.data.Dataset.from_tensor_slices(data).batch(4).take(steps or -1))
        assert len(ours) == len(theirs) == len(ArrayBatches(data, 4, steps))
        assert len(ours) == (2 if steps == 2 else 3)
        for a, b in zip(ours, theirs):
            tf.nest.assert_same_structure(a, b)
            for u, v in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
                assert u.dtype == v.numpy().dtype
                np.testing.assert_array_equal(u, v.numpy())


def test_progress_bar_counts_batches(capsys):
    model = dense_model()
    x, _ = _data(model, n=10)
    fisher_diagonal(model, x, likelihood="categorical", batch_size=4, verbose=1)
    out = capsys.readouterr().out
    # An integer count: `examples: 10.0000` (a float) must not pass.
    assert "3/3" in out and re.search(r"examples: 10(?![.\d])", out)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kwargs, message", [
    ({"estimator": "fast"}, "Unknown estimator"),
    ({"likelihood": "poisson"}, "Unknown likelihood"),
    ({"samples": 3}, "applies only to estimator='sampled'"),
    ({"estimator": "sampled", "samples": 0}, "samples >= 1"),
    ({"batch_size": 0}, "batch_size >= 1"),
])
def test_bad_arguments(kwargs, message):
    model = dense_model()
    x, _ = _data(model)
    kwargs.setdefault("likelihood", "categorical")
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(model, x, verbose=0, **kwargs)


def test_bad_data():
    model = dense_model()
    x, y = _data(model)
    with pytest.raises(ValueError, match="no examples"):
        fisher_diagonal(model, x[:0], likelihood="categorical", verbose=0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fisher_diagonal(model, bad, likelihood="categorical", verbose=0)
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        fisher_diagonal(model, (x, y + 4), estimator="empirical", likelihood="categorical",
                        verbose=0)
    with pytest.raises(ValueError, match="needs the true labels"):
        fisher_diagonal(model, x, estimator="empirical", likelihood="categorical", verbose=0)
    with pytest.raises(ValueError, match="first .* dimension"):
        fisher_diagonal(model, (x, y[:4]), estimator="empirical", likelihood="categorical",
                        verbose=0)
    with pytest.raises(ValueError, match="infer the likelihood"):
        fisher_diagonal(model, x, verbose=0)


@pytest.mark.backend_neutral
def test_unbuilt_model_is_rejected():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        fisher_diagonal(model, np.zeros((2, 4), "float32"), likelihood="categorical",
                        verbose=0)


# --- the cached loop -------------------------------------------------------------------


def test_consolidating_twice_traces_once():
    """A second call, on other data with the same signature and a ragged last batch,
    reuses the traced step; so does a model wrapped by EWCModel."""
    from keras_ewc import EWCModel
    from keras_ewc.fisher import diagonal

    model = dense_model()
    x, y = _data(model, n=16)
    for estimator in ("exact", "empirical"):
        fisher_diagonal(model, (x, y), estimator=estimator, likelihood="categorical",
                        batch_size=8, verbose=0)
        fisher_diagonal(model, (x[:13] * 2, y[:13]), estimator=estimator,
                        likelihood="categorical", batch_size=8, verbose=0)
    assert diagonal.trace_count(model) == 2  # one a estimator

    ewc = EWCModel(dense_model(), strength=1.0)
    ewc.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ewc(x[:1])
    ewc.consolidate(tf.data.Dataset.from_tensor_slices((x, y)).batch(5), verbose=0)
    ewc.consolidate(tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(5), verbose=0)
    assert diagonal.trace_count(ewc.network) == 1


def test_ragged_last_batch_is_padded_exactly_without_retracing():
    model = conv_model()
    x, y = _data(model, n=11, classes=3)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 4, 4, 3
    for estimator, expected in (
        ("exact", oracle.categorical_exact(model, model.trainable_variables, x)),
        ("empirical", oracle.categorical_labels(model, model.trainable_variables, x, y)),
    ):
        fisher = fisher_diagonal(model, ds, estimator=estimator, likelihood="categorical",
                                 batch_size=4, verbose=0)
        oracle.assert_close(fisher, expected)
    from keras_ewc.fisher import diagonal

    assert diagonal.trace_count(model) == 2


def _step_sizes(model):
    from keras_ewc.fisher import diagonal

    return sorted(key[4] for key in diagonal._STEPS[model])


def test_automatic_batches_combine_the_datasets_batches():
    """Without batch_size, small batches are re-cut into one traced call of up to
    AUTO_BATCH_SIZE examples; the Fisher is the same."""
    from keras_ewc.fisher import diagonal

    model = dense_model()
    x, y = _data(model, n=23)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    fisher = fisher_diagonal(model, ds, estimator="empirical", likelihood="categorical",
                             verbose=0)
    oracle.assert_close(fisher, oracle.categorical_labels(model, model.trainable_variables,
                                                          x, y))
    assert _step_sizes(model) == [64]  # one call for all 23 examples (MIN_AUTO_BATCH_SIZE)
    fisher_diagonal(model, ds.take(2), estimator="empirical", likelihood="categorical",
                    verbose=0)  # 6 examples: padded into the same step
    assert diagonal.trace_count(model) == 1


def test_a_large_model_may_hold_a_few_gradient_steps_worth(monkeypatch, chosen_sizes):
    """Where MEMORY_BUDGET would cut a call below what GRADIENT_MEMORY_RATIO batched
    gradient steps of DEFAULT_BATCH_SIZE examples hold (counted the same way), the
    automatic batch takes the latter; the Fisher is the same."""
    from keras_ewc.fisher import diagonal

    model = conv_model()
    x, y = _data(model, n=11, classes=3)
    fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    per_example = next(iter(diagonal._STEPS[model].values())).per_example_bytes()
    gradient = diagonal.gradient_bytes(model, model.trainable_variables, (x,))
    # More than the forward pass alone, counted the same way, and less than the exact
    # Fisher's step (its T term columns back-propagated, the kernels' products).
    size = diagonal._COUNTED_SIZE
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([size, *x.shape[1:]], tf.float32)).graph
    assert diagonal._per_example_bytes(forward, size) < gradient < per_example
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 1)  # alone: calls of one example
    monkeypatch.setattr(diagonal, "MIN_MEMORY_CHUNK", 1)
    # Four and a half examples of the Fisher step's bytes, as gradient steps: calls of 4.
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO",
                        4.5 * per_example / (diagonal.DEFAULT_BATCH_SIZE * gradient))
    diagonal._STEPS.pop(model)
    chosen = chosen_sizes()
    fisher = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    assert chosen == [4]
    assert 4 in _step_sizes(model) and len(_step_sizes(model)) <= 2  # (the guess's too)
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def test_the_memory_bound_cuts_no_call_below_min_memory_chunk(monkeypatch, chosen_sizes):
    """However little memory the bounds allow, a call takes MIN_MEMORY_CHUNK examples
    (16); the Fisher is the same."""
    from keras_ewc.fisher import diagonal

    model = conv_model()
    x, _ = _data(model, n=40, classes=3)
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO", 0)
    chosen = chosen_sizes()
    fisher = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    assert chosen == [16]
    assert _step_sizes(model) == [16]  # the guess (any) says 16 too: traced once
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("guess, bytes_of, parts, size, traced, chosen", [
    (30, lambda n: 30, 1, 128, [32], 32),             # guessed right: traced once
    (None, lambda n: 30, 1, 128, [128, 32], 32),      # no guess: the data's size first
    (5, lambda n: 30, 1, 128, [128, 32], 32),         # guessed too few bytes: cut after
    (100, lambda n: 30, 1, 128, [16, 32], 32),        # guessed too many: grown after
    (100, lambda n: 9 + n, 1, 128, [16, 32], 16),     # grown, but the larger counts more
    (100, lambda n: 7 if n == 16 else 20, 1, 128, [16, 128, 32], 32),  # ... so between
    (2, lambda n: 2, 1, 128, [128], 128),             # no cut at all
    (30, lambda n: 30, 3, 128, [33], 33),             # a multiple of the devices
    (1000, lambda n: 1000, 1, 16, [16], 16),          # no cut below MIN_MEMORY_CHUNK
])
def test_the_automatic_step_is_traced_at_the_guess_and_again_only_when_counted_off(
        monkeypatch, guess, bytes_of, parts, size, traced, chosen):
    """`automatic_step` traces first the size the loop's guess of the bytes implies;
    the count of that step decides, and a size it allows is traced as well (a larger
    one only if its own count allows it). The budget here: 1000 bytes a call."""
    from keras_ewc.fisher import diagonal

    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 1000)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO", 0)
    monkeypatch.setattr(diagonal, "gradient_bytes", lambda *args: 1)

    class Step:
        def __init__(self, batch_size):
            self.batch_size = batch_size

    class Loop:
        model, variables = None, []

        def guessed_bytes(self, batch):
            return guess

    steps = {}

    def step_at(n):
        return steps.setdefault(n, Step(n))

    step = diagonal.automatic_step(Loop(), None, size, step_at,
                                   lambda step: bytes_of(step.batch_size), parts)
    assert list(steps) == traced
    assert step.batch_size == chosen


def _automatic_loop(model, x, estimator="exact"):
    """An automatic batch's loop over `x` that has seen its first rows."""
    from keras_ewc.fisher import diagonal, likelihoods

    loop = diagonal._Loop(model, model.trainable_variables, likelihoods.get("categorical"),
                          estimator, 1, 0, None, auto=True)
    loop.probe = model(x[:8], training=False)
    loop.num_outputs = int(loop.probe.shape[-1])
    return loop


def test_a_good_guess_of_the_memory_traces_the_cut_step_once(monkeypatch, chosen_sizes):
    """Where the guess and the step's count allow the same size, the automatic batch
    traces one step (not one at the data's size to count, then the cut one); the Fisher
    is the same."""
    from keras_ewc.fisher import diagonal

    model = conv_model()
    x, _ = _data(model, n=40, classes=3)
    loop = _automatic_loop(model, x)
    guess = loop.guessed_bytes((x,))
    count = diagonal._Step(model, model.trainable_variables, loop.lik, "exact", None, 16,
                           diagonal._relaxed_spec((x,)), loop.num_outputs).per_example_bytes()
    # The guess is within 2× of the count on this model (else no budget fits both).
    assert count / 2 < guess < 2 * count, (guess, count)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO", 0)
    # A budget for 16 to 31 examples by either: calls of 16 (MIN_MEMORY_CHUNK).
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET",
                        int(min(17 * max(guess, count), 31.5 * min(guess, count))))
    chosen = chosen_sizes()
    fisher = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    assert chosen == [16]
    assert _step_sizes(model) == [16] and diagonal.trace_count(model) == 1
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))


def test_the_guess_counts_the_columns_the_graph_holds(monkeypatch):
    """The guess grows with the term columns (exact: one a class; empirical: one), counts
    one round where the columns run in a loop, and is not made for custom sums or where
    the likelihood's terms fail (the step then raises)."""
    from keras_ewc.fisher import diagonal, fast

    model = dense_model(classes=9)
    x, _ = _data(model, n=16, classes=9)
    loop = _automatic_loop(model, x)
    exact = loop.guessed_bytes((x,))
    empirical = _automatic_loop(model, x, "empirical").guessed_bytes((x,))
    gradient = diagonal.gradient_bytes(model, model.trainable_variables, (x,))
    assert empirical == int(gradient * (1 + diagonal._GUESSED_OVERHEAD)) < exact
    monkeypatch.setattr(fast, "COLUMNS_A_ROUND", 3)
    assert loop.guessed_bytes((x,)) == int(gradient * (3 + diagonal._GUESSED_OVERHEAD))
    monkeypatch.setattr(loop.lik, "exact_terms", lambda outputs: 1 / 0)
    assert loop.guessed_bytes((x,)) is None
    loop.sums = object()
    assert loop.guessed_bytes((x,)) is None


def test_automatic_batches_are_cut_to_the_memory_budget(monkeypatch, chosen_sizes):
    """A step whose batch-sized tensors pass MEMORY_BUDGET runs in chunks (never fewer
    than MIN_MEMORY_CHUNK examples), exactly, and later calls reuse the traces."""
    from keras_ewc.fisher import diagonal

    model = conv_model()
    x, y = _data(model, n=11, classes=3)
    monkeypatch.setattr(diagonal, "MIN_AUTO_BATCH_SIZE", 1)
    monkeypatch.setattr(diagonal, "MIN_MEMORY_CHUNK", 1)
    monkeypatch.setattr(diagonal, "GRADIENT_MEMORY_RATIO", 0)  # the fixed budget alone
    # A budget for four examples of this step (and not five): chunks of 4, 4, 3.
    monkeypatch.setattr(diagonal, "AUTO_BATCH_SIZE", 8)
    fisher_diagonal(model, x[:8], likelihood="categorical", verbose=0)
    per_example = next(iter(diagonal._STEPS[model].values())).per_example_bytes()
    monkeypatch.setattr(diagonal, "MEMORY_BUDGET", 4 * per_example + per_example // 2)
    diagonal._STEPS.pop(model)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    chosen = chosen_sizes()
    fisher = fisher_diagonal(model, ds, likelihood="categorical", verbose=0)
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))
    assert chosen == [4]
    traces = diagonal.trace_count(model)
    fisher_diagonal(model, (x, y), estimator="exact", likelihood="categorical", verbose=0)
    assert diagonal.trace_count(model) == traces


def test_batches_that_cannot_be_recut_are_kept():
    """Padded sequences of different lengths cannot be re-cut across batches: each batch
    is used as it is (and the Fisher equals the per-example oracle)."""
    from keras_ewc.fisher import diagonal

    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              keras.layers.Embedding(6, 3),
                              keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(2)])
    lengths = [2, 3, 5, 1, 4]
    sequences = [np.arange(1, n + 1, dtype="int32") % 6 for n in lengths]
    labels = np.array([0, 1, 1, 0, 1], "int32")
    ds = tf.data.Dataset.from_generator(
        lambda: iter(zip(sequences, labels)),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)),
    ).padded_batch(2)
    assert diagonal.rebatch(ds, 8) is ds
    fisher = fisher_diagonal(model, ds, estimator="empirical", likelihood="categorical",
                             verbose=0)
    expected = [0.0 * v for v in model.trainable_variables]
    for batch_x, batch_y in ds:
        for i in range(len(batch_x)):
            one = oracle.categorical_labels(model, model.trainable_variables,
                                            batch_x[i:i + 1].numpy(), batch_y[i:i + 1].numpy())
            expected = [e + f / len(lengths) for e, f in zip(expected, one)]
    oracle.assert_close(fisher, expected)


@pytest.mark.backend_neutral
def test_sample_weights_give_a_weighted_mean():
    model = dense_model()
    x, y = _data(model, n=9)
    w = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0, 0.0, 1.0, 1.5], "float32")
    fisher = fisher_diagonal(model, (x, y, w), estimator="empirical",
                             likelihood="categorical", batch_size=4, verbose=0)
    per_example = [oracle.categorical_labels(model, model.trainable_variables, x[i:i + 1],
                                             y[i:i + 1]) for i in range(len(x))]
    expected = [sum(w[i] * p[k] for i, p in enumerate(per_example)) / w.sum()
                for k in range(len(fisher))]
    oracle.assert_close(fisher, expected)


def test_the_cache_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = dense_model()
    x, _ = _data(model)
    fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_progress_shows_integer_counts_and_no_control_codes_in_a_file(capsys):
    model = dense_model()
    x, _ = _data(model, n=10)
    fisher_diagonal(model, x, likelihood="categorical", batch_size=4, verbose=1)
    out = capsys.readouterr().out
    assert "3/3 batches - examples: 10 " in out
    assert "\r" not in out and "\b" not in out and "\x1b" not in out
    assert out.count("\n") == 1


class TiedHead(keras.Model):
    """Reads its hidden layer's kernel again outside that layer: a tied weight."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(3, name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.hidden(x) + tf.reduce_sum(self.hidden.kernel ** 2))


def test_paths_and_fallback_modes():
    from keras_ewc.fisher import kernel_paths

    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((3, 2)),
        # RNN around a cell: no kernel covers it, it goes layer-local.
        keras.layers.RNN(keras.layers.SimpleRNNCell(4), name="rnn"),
        keras.layers.Dense(3, name="head")])
    x, _ = _data(model, n=6, classes=3)
    static = kernel_paths(model)
    assert static[model.layers[1].kernel.path] == "fast"
    assert {static[v.path] for v in model.layers[0].trainable_variables} == {"layer-local"}
    fisher, paths = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                    return_paths=True, fallback="error")
    assert paths == static
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, x))

    tied = TiedHead()
    tied(x[:, 0])
    x2 = x[:, 0]
    assert kernel_paths(tied)[tied.hidden.kernel.path] == "fast"  # found only when traced
    fisher, paths = fisher_diagonal(tied, x2, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert paths[tied.hidden.kernel.path] == "reference"
    assert paths[tied.hidden.bias.path] == paths[tied.head.kernel.path] == "fast"
    oracle.assert_close(fisher, oracle.categorical_exact(tied, tied.trainable_variables, x2))
    with pytest.warns(UserWarning, match=r"1 variable\(s\) take the whole-network .*hidden"):
        fisher_diagonal(tied, x2, likelihood="categorical", verbose=0, fallback="warn")
    with pytest.raises(ValueError, match=r"per-example reference path.*register_kernel"):
        fisher_diagonal(tied, x2, likelihood="categorical", verbose=0, fallback="error")
    with pytest.raises(ValueError, match=r"fallback in \('allow', 'warn', 'error'\)"):
        fisher_diagonal(tied, x2, likelihood="categorical", verbose=0, fallback="never")
    head_only = fisher_diagonal(tied, x2, likelihood="categorical", verbose=0,
                                fallback="error", variables=tied.head.trainable_variables)
    oracle.assert_close(head_only, fisher[-2:])


class Scale(keras.layers.Layer):
    """y = x * w, elementwise: a user's layer with no built-in kernel."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


def test_register_kernel_for_a_users_layer():
    from keras_ewc.fisher import Kernel, register_kernel

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), Scale(), keras.layers.Dense(4)])
    model.layers[0].w.assign(np.linspace(0.5, 1.5, 5))
    x, _ = _data(model, n=7)
    _, before = fisher_diagonal(model, x, likelihood="categorical", verbose=0,
                                return_paths=True)
    assert before[model.layers[0].w.path] == "layer-local"

    calls = []

    @register_kernel(Scale)
    class ScaleKernel(Kernel):
        def params(self, layer):
            return {"w": layer.w}

        def forward(self, layer, args, kwargs):
            calls.append(layer.name)
            x = args[0]
            return x, x * tf.stop_gradient(layer.w), lambda z: z

        def sum_squared(self, layer, records, grads):
            per_example = sum(x[None] * g for x, g in zip(records, grads))
            return {"w": tf.reduce_sum(tf.square(per_example), axis=[0, 1])}

    model2 = keras.Sequential([keras.Input((5,)), Scale(), keras.layers.Dense(4)])
    model2.set_weights(model.get_weights())
    fisher, paths = fisher_diagonal(model2, x, likelihood="categorical", verbose=0,
                                    return_paths=True)
    assert set(paths.values()) == {"fast"} and calls
    oracle.assert_close(fisher, oracle.categorical_exact(model2, model2.trainable_variables, x))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("args, message", [
    ((int,), "Expected Keras layer classes"),
    ((), "at least one Keras layer class"),
])
def test_register_kernel_rejects_what_is_not_a_layer_class(args, message):
    from keras_ewc.fisher import register_kernel

    with pytest.raises(ValueError, match=message):
        register_kernel(*args)


@pytest.mark.backend_neutral
def test_register_kernel_rejects_an_incomplete_kernel():
    from keras_ewc.fisher import register_kernel

    class Incomplete:
        def params(self, layer):
            return {}

    with pytest.raises(ValueError, match=r"lacks \['forward', 'sum_squared'\]"):
        register_kernel(Scale)(Incomplete)


@pytest.mark.parametrize("weights, message", [
    ([1, -1, 1, 1, 1], r"weights >= 0 and finite. Received weights in \[-1, 1\]"),
    ([1, np.nan, 1, 1, 1], r"in \[1, 1\] with NaN"),
    ([1, np.inf, 1, 1, 1], r"\[1, inf\]"),
    ([0, 0, 0, 0, 0], "only examples of sample weight 0"),
])
def test_bad_sample_weights_are_reported_after_the_traced_loop(weights, message):
    model = dense_model()
    x, y = _data(model, n=5)
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(model, (x, y, np.array(weights, "float32")),
                        likelihood="categorical", batch_size=2, verbose=0)
