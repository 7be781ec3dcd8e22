"""The consolidated state: pure merges, the penalty, and the Keras object."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ewc
from keras_ewc import penalty as P


def _random_tasks(rng, shapes, count):
    tasks = []
    for _ in range(count):
        fisher = [rng.gamma(0.5, 1.0, size=s).astype("float32") for s in shapes]
        # Some entries carry no information in some tasks: exercises P' = 0.
        fisher[0][..., 0] = 0.0
        theta = [rng.normal(size=s).astype("float32") for s in shapes]
        tasks.append((fisher, theta))
    return tasks


def _explicit_sum(tasks, theta, strength):
    """Σ_t (λ/2) Σ F_t (θ − θ*_t)², written out with its own tape for the gradient."""
    with tf.GradientTape() as tape:
        tape.watch(theta)
        total = tf.constant(0.0, tf.float64)
        for fisher, anchor in tasks:
            for f, a, t in zip(fisher, anchor, theta):
                total += 0.5 * strength * tf.reduce_sum(
                    tf.cast(f, tf.float64) * tf.square(tf.cast(t, tf.float64) - a))
    return total.numpy(), [g.numpy() for g in tape.gradient(total, theta)]


def test_separate_mode_equals_sum_of_three_task_penalties():
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,)]
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    reg = keras_ewc.EWCRegularizer(strength=7.0)
    reg.build_for(net.trainable_variables)
    tasks = _random_tasks(rng, shapes, 3)
    for fisher, theta in tasks:
        reg.consolidate(fisher, theta)
    assert int(reg.tasks.numpy()) == 3
    # Evaluate at a point unrelated to every anchor.
    for v, s in zip(net.trainable_variables, shapes):
        v.assign(rng.normal(size=s).astype("float32"))
    with tf.GradientTape() as tape:
        value = reg.penalty()
    grads = tape.gradient(value, net.trainable_variables)
    theta = [tf.constant(v.numpy(), tf.float64) for v in net.trainable_variables]
    expected, expected_grads = _explicit_sum(tasks, theta, 7.0)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-6, atol=1e-6 * np.abs(e).max())
    # Two numbers a parameter, plus the scalars (offset, tasks, strength, gamma),
    # whatever the number of tasks.
    assert len(reg.weights) == 2 * len(shapes) + 4


@pytest.mark.backend_neutral
def test_online_mode_follows_its_recursion():
    rng = np.random.default_rng(1)
    shapes = [(2, 2)]
    var = keras.Variable(np.zeros((2, 2), "float32"))
    reg = keras_ewc.EWCRegularizer(strength=2.0, mode="online", gamma=0.5)
    reg.build_for([var])
    expected_p = np.zeros((2, 2))
    for fisher, theta in _random_tasks(rng, shapes, 3):
        reg.consolidate(fisher, theta)
        expected_p = 0.5 * expected_p + fisher[0]
        np.testing.assert_allclose(reg.precision[0].numpy(), expected_p, rtol=1e-6)
        np.testing.assert_allclose(reg.anchors[0].numpy(), theta[0])
    assert float(reg.offset.numpy()) == 0.0
    var.assign(np.ones((2, 2), "float32"))
    expected = 2.0 * 0.5 * np.sum(expected_p * (1.0 - theta[0]) ** 2)
    np.testing.assert_allclose(float(reg.penalty()), expected, rtol=1e-6)


@pytest.mark.backend_neutral
def test_first_merge_anchors_exactly_at_the_weights():
    tensor = keras.ops.convert_to_tensor
    fisher = [tensor(np.array([0.0, 2.0, 1e-30], "float32"))]
    theta = [tensor(np.array([1.5, -2.0, 3.0], "float32"))]
    zeros = [keras.ops.zeros(3)]
    p, m, c = P.merge_separate(zeros, zeros, tensor(np.float32(0.0)), fisher, theta)
    np.testing.assert_array_equal(np.asarray(m[0]), np.asarray(theta[0]))
    np.testing.assert_array_equal(np.asarray(p[0]), np.asarray(fisher[0]))
    assert float(c) == 0.0


@pytest.mark.backend_neutral
def test_penalty_is_zero_before_any_consolidation():
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    net.layers[0].kernel.assign(np.full((3, 2), 5.0, "float32"))
    reg = keras_ewc.EWCRegularizer(strength=1e6)
    reg.build_for(net.trainable_variables)
    assert float(reg.penalty()) == 0.0


@pytest.mark.backend_neutral
def test_state_is_float32_under_mixed_precision_weights():
    var = keras.Variable(np.ones(4, "float16"), dtype="float16")
    reg = keras_ewc.EWCRegularizer(strength=1.0)
    reg.build_for([var])
    reg.consolidate([np.full(4, 1e-12, "float32")], [np.zeros(4, "float32")])
    assert reg.precision[0].dtype == "float32"
    assert reg.penalty().dtype == tf.float32
    # 1e-12 survives: it would underflow to 0 in float16.
    np.testing.assert_allclose(reg.precision[0].numpy(), 1e-12)
    np.testing.assert_allclose(float(reg.penalty()), 0.5 * 4 * 1e-12, rtol=1e-5)


@pytest.mark.backend_neutral
@pytest.mark.parametrize("kwargs, message", [
    ({"strength": -1.0}, "strength >= 0"),
    ({"strength": float("nan")}, "strength >= 0"),
    ({"gamma": 0.0}, "gamma in (0, 1]"),
    ({"gamma": 1.5}, "gamma in (0, 1]"),
    ({"mode": "sum"}, "mode in"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        keras_ewc.EWCRegularizer(**kwargs)


@pytest.mark.backend_neutral
def test_bad_fisher_leaves_the_state_unchanged():
    var = keras.Variable(np.ones(3, "float32"))
    reg = keras_ewc.EWCRegularizer(strength=1.0)
    reg.build_for([var])
    reg.consolidate([np.ones(3, "float32")])
    before = [w.numpy().copy() for w in reg.weights]
    for bad, message in (([np.array([1.0, np.nan, 1.0], "float32")], "finite, non-negative"),
                         ([np.array([1.0, -1.0, 1.0], "float32")], "finite, non-negative"),
                         ([np.ones(4, "float32")], r"shape \(3,\)")):
        with pytest.raises(ValueError, match=message):
            reg.consolidate(bad)
    for w, b in zip(reg.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


@pytest.mark.backend_neutral
def test_unbuilt_regularizer_says_so():
    reg = keras_ewc.EWCRegularizer()
    with pytest.raises(ValueError, match="build_for"):
        reg.penalty()


@pytest.mark.backend_neutral
def test_config_round_trip():
    reg = keras_ewc.EWCRegularizer(strength=3.0, mode="online", gamma=0.9)
    again = keras_ewc.EWCRegularizer.from_config(reg.get_config())
    assert (again.strength, again.mode, again.gamma) == (3.0, "online", 0.9)


def test_closed_form_gradient_matches_autodiff_of_the_quadratic_in_float64():
    rng = np.random.default_rng(5)
    shapes = [(3, 2), (2,)]
    precision = [rng.gamma(0.5, 1.0, s).astype("float32") for s in shapes]
    anchor = [rng.normal(size=s).astype("float32") for s in shapes]
    theta = [tf.Variable(rng.normal(size=s).astype("float32")) for s in shapes]
    with tf.GradientTape() as tape:
        value = P.penalty_with_gradient(tf.constant(3.0), precision, anchor,
                                        tf.constant(0.25), [tf.convert_to_tensor(t)
                                                            for t in theta])
    grads = tape.gradient(value, theta)
    theta64 = [tf.constant(t.numpy(), tf.float64) for t in theta]
    with tf.GradientTape() as tape:
        tape.watch(theta64)
        oracle = 3.0 * (0.25 + sum(0.5 * tf.reduce_sum(p.astype("float64") * (t - m) ** 2)
                                   for p, m, t in zip(precision, anchor, theta64)))
    expected = tape.gradient(oracle, theta64)
    np.testing.assert_allclose(float(value), float(oracle), rtol=1e-6)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6)


def _jax_state(rng, dtype="float32"):
    shapes = [(3, 2), (2,), ()]
    precision = [rng.gamma(0.5, 1.0, s).astype("float32") for s in shapes]
    anchor = [rng.normal(size=s).astype("float32") for s in shapes]
    theta = [rng.normal(size=s).astype(dtype) for s in shapes]
    return precision, anchor, theta


@pytest.mark.jax_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_closed_form_gradients_match_a_float64_oracle(dtype):
    # Every argument's gradient (θ's in θ's dtype), not only θ's: the derivative rule
    # covers every argument, as autodiff did. The oracle differentiates by hand in
    # float64.
    import jax
    import jax.numpy as jnp

    from keras_ewc.backend.jax import penalty as jax_penalty

    rng = np.random.default_rng(6)
    precision, anchor, theta = _jax_state(rng, "float32")
    theta = [jnp.asarray(t).astype(dtype) for t in theta]
    args = (jnp.float32(3.0), [jnp.asarray(p) for p in precision],
            [jnp.asarray(m) for m in anchor], jnp.float32(0.25), theta)
    step = jax.jit(jax.value_and_grad(
        lambda *a: jax_penalty.penalty(*a, jnp.int32(2)), argnums=(0, 1, 2, 3, 4)))
    value, (g_s, g_p, g_m, g_c, g_t) = step(*args)
    p64 = [np.float64(p) for p in precision]
    m64 = [np.float64(m) for m in anchor]
    t64 = [np.asarray(t, np.float64) for t in theta]
    d = [t - m for t, m in zip(t64, m64)]
    unscaled = 0.25 + sum(0.5 * np.sum(p * e * e) for p, e in zip(p64, d))
    np.testing.assert_allclose(float(value), 3.0 * unscaled, rtol=1e-6)
    np.testing.assert_allclose(float(g_s), unscaled, rtol=1e-6)
    np.testing.assert_allclose(float(g_c), 3.0, rtol=1e-6)
    tolerance = 1e-6 if dtype == "float32" else 1e-2  # θ's gradient is rounded to θ's dtype
    for gt, gp, gm, p, e in zip(g_t, g_p, g_m, p64, d):
        assert gt.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(gt, np.float64), 3.0 * p * e, rtol=tolerance,
                                   atol=1e-7)
        np.testing.assert_allclose(gm, -3.0 * p * e, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gp, 1.5 * e * e, rtol=1e-6, atol=1e-7)


@pytest.mark.jax_only
def test_jax_penalty_keeps_forward_mode_and_second_derivatives():
    # A derivative rule for forward mode (not only reverse): `jacfwd` and `hessian`
    # work as with plain autodiff; the Hessian in θ is diag(strength * P).
    import jax
    import jax.numpy as jnp

    from keras_ewc.backend.jax import penalty as jax_penalty

    precision, anchor, theta = _jax_state(np.random.default_rng(9))

    def value(t):
        return jax_penalty.penalty(jnp.float32(3.0), precision, anchor, jnp.float32(0.0),
                                   [jnp.asarray(theta[0]), t], jnp.int32(1))

    t = jnp.asarray(theta[1])
    np.testing.assert_allclose(jax.jacfwd(value)(t), 3.0 * precision[1] * (theta[1] - anchor[1]),
                               rtol=1e-6)
    np.testing.assert_allclose(jax.hessian(value)(t), np.diag(3.0 * precision[1]), rtol=1e-6)


@pytest.mark.jax_only
def test_jax_penalty_with_no_task_is_zero_with_zero_gradients_whatever_the_weights():
    # A state with no task is skipped: 0, and every gradient exactly 0 (a select, not a
    # product with the zero precision, which would give NaN for a non-finite weight).
    import jax
    import jax.numpy as jnp

    from keras_ewc.backend.jax import penalty as jax_penalty

    precision, anchor, theta = _jax_state(np.random.default_rng(7))
    theta = [jnp.full(np.shape(t), value, "float32")
             for t, value in zip(theta, (np.inf, np.nan, -np.inf))]
    precision = [np.zeros_like(p) for p in precision]
    grad = jax.jit(jax.value_and_grad(
        lambda *a: jax_penalty.penalty(*a, jnp.int32(0)), argnums=(0, 1, 2, 3, 4)))
    value, grads = grad(jnp.float32(3.0), precision, anchor, jnp.float32(0.0), theta)
    assert float(value) == 0.0
    for g in jax.tree.leaves(grads):
        np.testing.assert_array_equal(g, np.zeros_like(g))


def _compiled_train_step(model, x, y):
    """The HLO text of Keras' jitted train step of `model` (as `make_train_function`
    jits it: the state donated), after one `fit` has built everything."""
    import jax

    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    step = jax.jit(model.train_step, donate_argnums=0)
    return step.lower(state, (x, y)).compile().as_text()


def _copied_arrays(hlo):
    """The shapes of the non-scalar arrays the entry computation copies."""
    entry = hlo[hlo.index("ENTRY"):]
    return sorted(shape for shape in re.findall(r"= \w+\[([\d,]+)\]\S* copy\(", entry))


@pytest.mark.jax_only
@pytest.mark.parametrize("tasks", [0, 1])
def test_jax_train_step_saves_no_weight_sized_residual_and_copies_what_a_plain_step_does(
        tasks):
    # What made the step cost 0.1x a plain step more than a bare penalty (see
    # keras_ewc/backend/jax/penalty.py): autodiff of a conditional writes weight-sized
    # residuals out of it, and a conditional reading the weights made XLA copy each one
    # before updating it in place. Structure, not time: the only conditional returns
    # scalars, and the weights copied are the plain model's.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, 12)).astype("float32")
    y = rng.integers(0, 3, 16)

    def net():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((12,)), keras.layers.Dense(9, "relu"),
                                 keras.layers.Dense(7, "relu"), keras.layers.Dense(3)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = net()
    plain.compile(keras.optimizers.Adam(1e-3), loss)
    model = keras_ewc.EWCModel(net(), strength=10.0)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    for _ in range(tasks):
        model.regularizer.consolidate([rng.gamma(0.5, 1.0, v.shape).astype("float32")
                                       for v in model.regularised_variables])
    hlo = _compiled_train_step(model, x, y)
    conditionals = [line for line in hlo.splitlines() if " conditional(" in line]
    assert len(conditionals) == 1  # the penalty's value, skipped with no task
    outputs = conditionals[0].split("=", 1)[1].split("conditional(", 1)[0]
    assert "[]" in outputs and not re.search(r"\[\d", outputs), outputs
    assert _copied_arrays(hlo) == _copied_arrays(_compiled_train_step(plain, x, y))


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case, message", [
    ("short", r"Expected 2 precision and 2 anchor arrays.*Received 1 and 2"),
    ("shape", r"anchor of 1:bias: shape \(3,\), expected \(2,\)"),
    ("offset", r"offset: shape \(2,\), expected \(\)"),
    ("nan", r"not finite"),
    ("tasks", r"Expected a task count >= 0. Received: tasks=-1"),
    ("zero_tasks", r"Expected a zero precision and offset with tasks=0"),
], ids=["short", "shape", "offset", "nan", "tasks", "zero_tasks"])
def test_assign_state_checks_every_entry_before_assigning_any(case, message):
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    reg = keras_ewc.EWCRegularizer(strength=1.0)
    reg.build_for(net.trainable_variables)
    reg.consolidate([np.ones(v.shape, "float32") for v in net.trainable_variables])
    before = [w.numpy().copy() for w in reg.weights]
    good_p = [np.full((3, 2), 9.0, "float32"), np.full(2, 9.0, "float32")]
    good_m = [np.full((3, 2), 9.0, "float32"), np.full(2, 9.0, "float32")]
    args = {"short": (good_p[:1], good_m, 0.0, 2),
            "shape": (good_p, [good_m[0], np.zeros(3, "float32")], 0.0, 2),
            "offset": (good_p, good_m, np.zeros(2), 2),
            "nan": (good_p, [good_m[0], np.array([1.0, np.nan], "float32")], 0.0, 2),
            "tasks": (good_p, good_m, 0.0, -1),
            "zero_tasks": (good_p, good_m, 0.0, 0)}[case]
    with pytest.raises(ValueError, match=message):
        reg.assign_state(*args)
    for w, b in zip(reg.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    assert int(reg.tasks.numpy()) == 1
