"""keras_ewc.fisher.checks, alone and through fisher_diagonal and EWCModel.consolidate.

Weighted Fisher values are compared with the brute-force oracles (tests/oracle.py) on the
data with each example repeated w_n times: relative tolerance 1e-5 (oracle.assert_close).
"""

import pathlib

import keras
import numpy as np
import oracle
import pytest
import tensorflow as tf

import keras_ewc
from keras_ewc import fisher_diagonal
from keras_ewc.fisher import checks, diagonal, engine, likelihoods

CLASSES = 4


def net(activation=None, classes=CLASSES):
    return keras.Sequential([
        keras.Input((5,), name="features"), keras.layers.Dense(6, activation="tanh"),
        keras.layers.Dense(classes, activation=activation)])


def data(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, CLASSES, n)


WEIGHTS = np.array([2, 0, 1, 3, 1, 0, 1, 2, 1], "float32")


def expand(weights, *arrays):
    """Each example repeated w_n times (integer weights): the weighted mean's meaning."""
    index = np.repeat(np.arange(len(weights)), weights.astype(int))
    return [a[index] for a in arrays]


@pytest.fixture
def no_tracing(monkeypatch):
    """Fails the test if the per-batch engine is built: errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the engine was built before the error")

    monkeypatch.setattr(engine, "build_sum_squared_grads", refuse)
    monkeypatch.setattr(diagonal, "_Step", refuse)
    monkeypatch.setattr(diagonal, "_DistributedStep", refuse)


# --- §4: the likelihood against the outputs ------------------------------------------

@pytest.mark.backend_neutral
def test_probability_outputs_with_from_logits_true_are_refused(no_tracing):
    model = net("softmax")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, _ = data()
    with pytest.raises(ValueError, match=r"look like probabilities .*the compiled loss "
                       r"SparseCategoricalCrossentropy\(from_logits=True\).*"
                       r"SparseCategoricalCrossentropy\(from_logits=False\)"):
        fisher_diagonal(model, x, verbose=0)
    # An explicit likelihood goes through the same check.
    with pytest.raises(ValueError, match=r"likelihood=Categorical\(from_logits=True\)"):
        fisher_diagonal(model, x, likelihood=likelihoods.Categorical(from_logits=True),
                        verbose=0)


@pytest.mark.backend_neutral
def test_logits_with_the_string_loss_are_refused(no_tracing):
    model = net()
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, _ = data()
    with pytest.raises(ValueError, match=r"not probabilities .*'sparse_categorical_crossentropy'"
                       r" \(which means from_logits=False\).*from_logits=True"):
        fisher_diagonal(model, x, verbose=0)
    model.compile("sgd", "categorical_crossentropy")
    with pytest.raises(ValueError, match=r"CategoricalCrossentropy\(from_logits=True\)"):
        fisher_diagonal(model, x, verbose=0)


def test_the_right_pairing_still_gives_the_oracle():
    x, _ = data()
    model = net()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    oracle.assert_close(fisher_diagonal(model, x, verbose=0),
                        oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
def test_check_outputs_rules():
    logits_lik = likelihoods.Categorical(from_logits=True)
    probs_lik = likelihoods.Categorical(from_logits=False)
    rng = np.random.default_rng(0)
    probs = tf.nn.softmax(rng.normal(size=(32, 5)).astype("float32"))
    checks.check_outputs(probs_lik, probs)
    with pytest.raises(ValueError, match="look like probabilities"):
        checks.check_outputs(logits_lik, probs)
    # Logits are never refused, even all in [0, 1], unless EVERY row sums to 1 (to 1e-4).
    for _ in range(200):
        checks.check_outputs(logits_lik, tf.constant(rng.normal(size=(8, 5)), tf.float32))
    in_unit = rng.uniform(size=(16, 5)).astype("float32")
    checks.check_outputs(logits_lik, in_unit)
    near = probs.numpy().copy()
    near[3] *= 1.0005  # one row sums to 1.0005: not every row is a probability vector
    checks.check_outputs(logits_lik, near)
    with pytest.raises(ValueError, match=r"not probabilities \(outputs in \[-"):
        checks.check_outputs(probs_lik, tf.constant(rng.normal(size=(8, 5)), tf.float32))
    with pytest.raises(ValueError, match="rows summing to 1 only within"):
        checks.check_outputs(probs_lik, in_unit)  # sigmoid-like outputs
    # Probabilities within the tolerance of the output dtype are accepted.
    checks.check_outputs(probs_lik, near)
    with pytest.raises(ValueError, match="only within 0.01"):
        checks.check_outputs(probs_lik, probs * 1.01)
    checks.check_outputs(probs_lik, tf.cast(probs * 1.01, tf.float16))


def test_bernoulli_and_single_class_checks():
    x, _ = data()
    sigmoid = net("sigmoid", classes=3)
    with pytest.raises(ValueError, match=r"last layer applies a softmax or sigmoid.*"
                       r"BinaryCrossentropy\(from_logits=False\)"):
        fisher_diagonal(sigmoid, x, likelihood=likelihoods.Bernoulli(from_logits=True),
                        verbose=0)
    logits = net(classes=3)
    with pytest.raises(ValueError, match=r"not probabilities .*BinaryCrossentropy"):
        fisher_diagonal(logits, x, likelihood=likelihoods.Bernoulli(from_logits=False),
                        verbose=0)
    fisher_diagonal(logits, x, likelihood=likelihoods.Bernoulli(from_logits=True), verbose=0)
    with pytest.raises(ValueError, match="single output has a zero Fisher"):
        fisher_diagonal(net(classes=1), x, likelihood="categorical", verbose=0)


# --- §5: sample weights ----------------------------------------------------------------

def test_weighted_exact_equals_repeated_examples():
    model = net()
    x, y = data()
    fisher = fisher_diagonal(model, (x, y, WEIGHTS), likelihood="categorical",
                             batch_size=4, verbose=0)
    (xe,) = expand(WEIGHTS, x)
    oracle.assert_close(fisher, oracle.categorical_exact(model, model.trainable_variables, xe))
    ds = tf.data.Dataset.from_tensor_slices((x, y, WEIGHTS[:, None])).batch(3)
    again = fisher_diagonal(model, ds, likelihood="categorical", verbose=0)
    oracle.assert_close(again, fisher)
    unweighted = fisher_diagonal(model, (x, y), likelihood="categorical", verbose=0)
    assert not np.allclose(unweighted[0], fisher[0], rtol=1e-3)


@pytest.mark.backend_neutral
def test_weighted_empirical_equals_repeated_examples():
    model = net()
    x, y = data()
    fisher = fisher_diagonal(model, (x, y, WEIGHTS), estimator="empirical",
                             likelihood="categorical", batch_size=4, verbose=0)
    xe, ye = expand(WEIGHTS, x, y)
    oracle.assert_close(
        fisher, oracle.categorical_labels(model, model.trainable_variables, xe, ye))


def test_weighted_sampled_equals_repeated_examples_with_the_same_noise():
    model = net()
    x, y = data()
    fisher = fisher_diagonal(model, (x, y, WEIGHTS), estimator="sampled", samples=2, seed=3,
                             likelihood="categorical", batch_size=4, verbose=0)
    lik = likelihoods.Categorical(from_logits=True)
    labels = np.concatenate([
        lik.sample(model(x[s:s + 4], training=False),
                   tf.random.stateless_uniform([len(x[s:s + 4]), 2, CLASSES],
                                               seed=[3, i])).numpy()
        for i, s in enumerate(range(0, len(x), 4))])
    xe, le = expand(WEIGHTS, x, labels)
    oracle.assert_close(
        fisher, oracle.categorical_labels(model, model.trainable_variables, xe, le))


@pytest.mark.backend_neutral
def test_weighted_batched_uses_the_weighted_mean_loss():
    model = net()
    x, y = data()
    v = model.trainable_variables
    fisher = fisher_diagonal(model, (x, y, WEIGHTS), estimator="batched",
                             likelihood="categorical", batch_size=4, verbose=0)
    # Each batch's weighted mean loss is the plain mean loss of its repeated examples.
    parts = []
    for s in range(0, len(x), 4):
        xe, ye = expand(WEIGHTS[s:s + 4], x[s:s + 4], y[s:s + 4])
        parts.append(oracle.batched(model, v, xe, ye, len(xe)))
    expected = [sum(p[i] for p in parts) / len(parts) for i in range(len(v))]
    oracle.assert_close(fisher, expected)


@pytest.mark.backend_neutral
def test_badly_shaped_sample_weights_are_refused_before_tracing(no_tracing):
    x, y = data()
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(4, 1\).*Received .*\(4, 2\)"):
        fisher_diagonal(net(), (x, y, np.ones((9, 2), "float32")), likelihood="categorical",
                        batch_size=4, verbose=0)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("weights, message", [
    (np.array([1, -1, 1, 1, 1, 1, 1, 1, 1], "float32"), r"weights >= 0 .*\[-1, 1\]"),
    (np.array([1, np.nan, 1, 1, 1, 1, 1, 1, 1], "float32"), "with NaN"),
    (np.array([1, np.inf, 1, 1, 1, 1, 1, 1, 1], "float32"), r"\[1, inf\]"),
    (np.zeros(9, "float32"), "no examples .*sample weight 0"),
], ids=["negative", "nan", "inf", "all-zero"])
def test_bad_sample_weights_are_refused(weights, message):
    """Weight values are checked in the traced loop, every batch, and reported at its end."""
    x, y = data()
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(net(), (x, y, weights), likelihood="categorical", batch_size=4,
                        verbose=0)


# --- §5: steps and infinite data ------------------------------------------------------

@pytest.mark.backend_neutral
def test_infinite_dataset_needs_steps_and_steps_bound_the_data(no_tracing):
    x, y = data()
    model = net()
    forever = tf.data.Dataset.from_tensor_slices(x).batch(3).repeat()
    with pytest.raises(ValueError, match=r"infinite .*Pass steps="):
        fisher_diagonal(model, forever, likelihood="categorical", verbose=0)
    with pytest.raises(ValueError, match=r"infinite"):
        fisher_diagonal(model, forever, likelihood="categorical", batch_size=2, verbose=0)


def test_steps_bound_infinite_and_finite_data():
    x, y = data()
    model = net()
    forever = tf.data.Dataset.from_tensor_slices(x).batch(3).repeat()
    # Five batches of three from x repeated: x, then the first six examples again.
    bounded = fisher_diagonal(model, forever, likelihood="categorical", steps=5, verbose=0)
    xs = np.concatenate([x, x[:6]])
    oracle.assert_close(bounded, oracle.categorical_exact(model, model.trainable_variables, xs))
    first_two = fisher_diagonal(model, x, likelihood="categorical", batch_size=2, steps=2,
                                verbose=0)
    oracle.assert_close(first_two,
                        oracle.categorical_exact(model, model.trainable_variables, x[:4]))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("steps", [0, -2, 1.5, True, "3"])
def test_bad_steps_are_refused(steps):
    x, _ = data()
    with pytest.raises(ValueError, match=r"Expected steps: an integer >= 1 or None. "
                       rf"Received: steps={steps!r}"):
        fisher_diagonal(net(), x, likelihood="categorical", steps=steps, verbose=0)


# --- §5: empty batches --------------------------------------------------------------

def _with_empty_first_batch(x, y):
    empty = tf.data.Dataset.from_tensors((x[:0], y[:0]))
    return empty.concatenate(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))


def test_empty_first_batch_is_skipped():
    x, y = data()
    model = net()
    v = model.trainable_variables
    ds = _with_empty_first_batch(x, y)
    exact = fisher_diagonal(model, ds, likelihood="categorical", verbose=0)
    oracle.assert_close(exact, oracle.categorical_exact(model, v, x))
    emp = fisher_diagonal(model, ds, estimator="empirical", likelihood="categorical", verbose=0)
    oracle.assert_close(emp, oracle.categorical_labels(model, v, x, y))
    batched = fisher_diagonal(model, ds, estimator="batched", likelihood="categorical",
                              verbose=0)
    oracle.assert_close(batched, oracle.batched(model, v, x, y, 4))
    sampled = fisher_diagonal(model, ds, estimator="sampled", seed=5,
                              likelihood="categorical", verbose=0)
    lik = likelihoods.Categorical(from_logits=True)
    # The empty batch is skipped; the rest is re-cut into one call (automatic batches),
    # whose noise is drawn with seed [5, 0].
    labels = lik.sample(model(x, training=False),
                        tf.random.stateless_uniform([len(x), 1, CLASSES], seed=[5, 0])).numpy()
    oracle.assert_close(sampled, oracle.categorical_labels(model, v, x, labels))


@pytest.mark.backend_neutral
def test_all_empty_data_is_refused():
    x, y = data()
    ds = tf.data.Dataset.from_tensors((x[:0], y[:0])).repeat(2)
    for estimator in ("exact", "sampled", "empirical", "batched"):
        with pytest.raises(ValueError, match="holds no examples"):
            fisher_diagonal(net(), ds, estimator=estimator, likelihood="categorical",
                            verbose=0)


# --- §5: data that is not what the docstring says ---------------------------------------

def _functional_two_heads():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4)(inputs)
    return keras.Model(inputs, [keras.layers.Dense(3)(hidden), keras.layers.Dense(2)(hidden)])


class ListOutputs(keras.Model):
    def __init__(self):
        super().__init__()
        self.a = keras.layers.Dense(3)
        self.b = keras.layers.Dense(2)

    def call(self, x, training=False):
        return [self.a(x), self.b(x)]


def _built(model):
    model(np.zeros((1, 5), "float32"))
    return model


x0, y0 = data()
BAD_DATA = {
    "unbatched-dataset": (
        lambda: (net(), tf.data.Dataset.from_tensor_slices(x0), {}),
        r"inputs of shape \(5,\): the data has no batch dimension.*ds.batch"),
    "unbatched-dataset-rebatched": (
        lambda: (net(), tf.data.Dataset.from_tensor_slices((x0, y0)), {"batch_size": 4}),
        "no batch dimension"),
    "one-example-array": (
        lambda: (net(), x0[0], {}), r"x\[None\]"),
    "wrong-feature-size": (
        lambda: (net(), np.zeros((4, 6), "float32"), {}),
        r"shape \(None, 5\) for this model. Received inputs of shape \(4, 6\)"),
    "file-path": (lambda: (net(), "train.npz", {}), "not a file path.*'train.npz'"),
    "pathlib-path": (lambda: (net(), pathlib.Path("t.npz"), {}), "not a file path"),
    "list-of-arrays": (
        lambda: (net(), [x0, y0], {}), r"Python list of 2 items \(ndarray\).*tuple"),
    "list-of-numbers": (
        lambda: (net(), [0.5, 1.0, 2.0], {}), r"list of 3 items \(float\).*np.asarray"),
    "dict-of-features-and-label": (
        lambda: (net(), tf.data.Dataset.from_tensor_slices(
            {"image": x0, "label": y0}).batch(4), {}),
        r"dict with keys \['image', 'label'\].*named \['features'\].*ds.map"),
    "one-hot-wrong-width": (
        lambda: (net(), (x0, np.eye(3, dtype="float32")[y0 % 3]),
                 {"estimator": "empirical"}),
        r"\(9,\) or \(9, 1\) .*or \(9, 4\) \(one-hot\).*Received labels of shape \(9, 3\)"),
    "int-labels-B-by-2": (
        lambda: (net(), (x0, np.stack([y0, y0], 1)), {"estimator": "batched"}),
        r"Received labels of shape \(9, 2\)"),
    "bernoulli-labels-wrong-size": (
        lambda: (net(classes=3), (x0, np.zeros((9, 2), "float32")),
                 {"estimator": "empirical", "likelihood": "bernoulli"}),
        r"shape \(9, 3\), for a bernoulli likelihood. Received labels of shape \(9, 2\)"),
    "multi-output-functional": (
        lambda: (_functional_two_heads(), x0, {}), "single output tensor.*with 2 outputs"),
    "multi-output-subclassed": (
        lambda: (_built(ListOutputs()), x0, {}), "with 2 outputs.*net.outputs"),
}

# Values in every batch are checked inside the traced loop and reported at its end.
BAD_VALUES = {
    "nan-labels": (
        lambda: (net(), (x0, np.where(np.arange(9) == 2, np.nan, y0)),
                 {"estimator": "empirical"}),
        "labels contain NaN or Inf"),
    "inf-inputs": (
        lambda: (net(), np.where(np.arange(45).reshape(9, 5) == 7, np.inf, x0), {}),
        "inputs contain NaN or Inf"),
}


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_tracing(case, no_tracing):
    build, message = BAD_DATA[case]
    model, bad, kwargs = build()
    kwargs.setdefault("likelihood", "categorical")
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(model, bad, verbose=0, **kwargs)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_refused_after_the_traced_loop(case):
    build, message = BAD_VALUES[case]
    model, bad, kwargs = build()
    with pytest.raises(ValueError, match=message):
        fisher_diagonal(model, bad, verbose=0, likelihood="categorical", batch_size=4,
                        **kwargs)


def test_dict_keyed_by_the_input_name_is_accepted():
    model = net()
    x, _ = data()
    a = fisher_diagonal(model, {"features": x}, likelihood="categorical", verbose=0)
    oracle.assert_close(a, oracle.categorical_exact(model, model.trainable_variables, x))


@pytest.mark.backend_neutral
@pytest.mark.filterwarnings("ignore:When providing `inputs` as a dict")
def test_dict_keyed_as_the_model_was_built_is_accepted():
    # A functional model built on a dict of inputs whose tensors have other names (as
    # KerasHub backbones are) takes a dict with the same keys, as Keras' `fit` does.
    rng = np.random.default_rng(0)
    inputs = {"b": keras.Input((2,)), "a": keras.Input((3,))}
    joined = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(joined))
    x = {"a": rng.normal(size=(6, 3)).astype("float32"),
         "b": rng.normal(size=(6, 2)).astype("float32")}
    got = fisher_diagonal(model, x, likelihood="categorical", verbose=0)
    expected = [np.zeros(v.shape) for v in model.trainable_variables]
    for n in range(6):  # the oracle, an example at a time (its inputs as a dict)
        one = oracle.categorical_exact(
            lambda xi, training=False: model({"a": xi[:, :3], "b": xi[:, 3:]},
                                             training=training),
            model.trainable_variables,
            np.concatenate([x["a"][n:n + 1], x["b"][n:n + 1]], axis=1))
        expected = [e + o / 6 for e, o in zip(expected, one)]
    oracle.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"dict with keys \['a', 'c'\]"):
        fisher_diagonal(model, {"a": x["a"], "c": x["b"]}, likelihood="categorical",
                        verbose=0)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("where", ["kernel", "moving_variance"])
def test_non_finite_weights_name_the_variable(where, no_tracing):
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(6, name="hidden"),
        keras.layers.BatchNormalization(name="norm"), keras.layers.Dense(CLASSES, name="out")])
    x, y = data()
    target = {"kernel": model.get_layer("out").kernel,
              "moving_variance": model.get_layer("norm").moving_variance}[where]
    value = target.numpy()
    value.flat[1] = np.nan if where == "kernel" else np.inf
    target.assign(value)
    with pytest.raises(ValueError, match=rf"weights are not finite: variable "
                       rf"'{target.path}' holds NaN or Inf values \(1 of"):
        fisher_diagonal(model, (x, y), estimator="empirical", likelihood="categorical",
                        verbose=0)


# --- the pure functions on their own ------------------------------------------------

@pytest.mark.backend_neutral
def test_check_label_shape_and_inputs_accept_what_fits():
    cat = likelihoods.Categorical()
    for shape in [(8,), (8, 1), (8, 4)]:
        checks.check_label_shape(cat, (8, 4), shape)
    checks.check_label_shape(likelihoods.Gaussian(), (8, 2, 3), (8, 6))
    model = net()
    checks.check_inputs(model, tf.TensorSpec([None, 5]))
    checks.check_inputs(model, {"features": tf.TensorSpec([None, 5])})
    checks.check_inputs(keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)]),
                        tf.TensorSpec([None]))  # Keras adds the trailing axis itself
    with pytest.raises(ValueError, match=r"takes 1 input\(s\).*Received 2 input tensors"):
        checks.check_inputs(model, (tf.TensorSpec([None, 5]), tf.TensorSpec([None, 5])))


# --- through EWCModel.consolidate -------------------------------------------------------

def test_a_refused_consolidate_leaves_the_state_as_it_was():
    x, y = data(n=16)
    model = keras_ewc.EWCModel(net(), strength=1.0)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.consolidate((x, y), verbose=0)
    before = [p.numpy().copy() for p in model.regularizer.precision]
    assert any(np.abs(b).sum() > 0 for b in before)
    model.compile("sgd", "sparse_categorical_crossentropy")  # logits read as probabilities
    with pytest.raises(ValueError, match=r"not probabilities .*'sparse_categorical_crossentr"):
        model.consolidate((x, y), verbose=0)
    forever = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="infinite"):
        model.consolidate(forever, verbose=0)
    with pytest.raises(ValueError, match="weights >= 0"):
        model.consolidate((x, y, -np.ones(16, "float32")), verbose=0)
    for p, b in zip(model.regularizer.precision, before):
        np.testing.assert_array_equal(p.numpy(), b)
    assert int(model.regularizer.tasks.numpy()) == 1
