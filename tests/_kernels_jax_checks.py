"""Every built-in Fisher kernel on JAX, against a per-example oracle; one JSON line a case.

Run by tests/test_kernels_jax.py in its own process (Keras picks its backend at import):

    KERAS_BACKEND=jax PYTHONPATH=. python tests/_kernels_jax_checks.py [case ...]

For each case a tiny layer is built on JAX with random weights (biases and moving
statistics included), and two computations of Σ_n Σ_t (∂ terms[n, t] / ∂ v)² are
compared for each of its variables v, with terms[n, t] = Σ w[t] ∘ layer(x)[n] (T = 2 random
term columns, summed over the layer's calls):
- the kernel: `kernel.forward` with a zero probe added at z, the T columns' gradients at
  the probes from one `jax.vjp` (vmapped over one-hot cotangents), then
  `kernel.sum_squared`, all inside one `jax.jit` with the weights passed as arguments;
- the oracle: one example at a time, `jax.jacrev` of its T terms with respect to the
  layer's weights through `layer.stateless_call`, squared and summed.
Each case runs twice: with the kernels' default memory budget and with a budget of one
element (`_common.BUDGET = 1`), so that every chunked path slices one example at a time;
a few (`NEW_WEIGHTS`) run their compiled function again at new weights.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np

from keras_ewc.fisher import kernels
from keras_ewc.fisher.kernels import _common

L = keras.layers
B, T = 4, 2


def kernel_sum_squared(kernel, layer, calls, terms_fn):
    """A jittable `f(values) -> {name: Σ_n Σ_t (per-example gradient)²}` for one layer.

    The way a JAX engine calls a kernel: inside the traced function the layer's weights
    are the arguments `values` (aligned with `layer.variables`), bound to the variables
    through `keras.StatelessScope`, so that `kernel.forward` (which reads them through
    `keras.ops.stop_gradient`) sees the traced values, not constants frozen at trace time.
    A zero probe is added at each call's pre-activation `z`; one `jax.vjp` of the
    `[B, T]` terms with respect to the probes, vmapped over the T one-hot column
    cotangents, gives every example's gradient at `z`, `[T, B, *z.shape[1:]]` a call.

    Args:
        kernel: the layer's `Kernel` (`kernels.lookup(layer)`).
        layer: a built Keras layer.
        calls: the layer's calls, a list of `(args, kwargs)`.
        terms_fn: maps the list of the calls' outputs to the `[B, T]` terms.
    """
    import jax
    import jax.numpy as jnp

    def fn(values):
        with keras.StatelessScope(state_mapping=list(zip(layer.variables, values))):
            # The probes' shapes: z of each call (a forward the compiler drops).
            zeros = [jnp.zeros_like(kernel.forward(layer, a, k)[1]) for a, k in calls]

            def run(probes):
                records, outputs = [], []
                for (args, kwargs), probe in zip(calls, probes):
                    record, z, finish = kernel.forward(layer, args, kwargs)
                    records.append(record)
                    outputs.append(finish(z + probe))
                return terms_fn(outputs), records

            terms, pullback, records = jax.vjp(run, zeros, has_aux=True)
            columns = terms.shape[1]
            cotangents = jnp.eye(columns, dtype=terms.dtype)[:, None, :] * jnp.ones_like(
                terms)[None]  # [T, B, T]: column t's one-hot, for every example
            (grads,) = jax.vmap(pullback)(cotangents)
            return kernel.sum_squared(layer, records, list(grads))

    return fn


def oracle(layer, calls, terms_fn):
    """`{variable path: Σ_n Σ_t (∂ terms[n, t] / ∂ v)²}`, one example at a time."""
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    total = [0.0 for _ in trainable]
    for n in range(B):
        def terms(weights, n=n):
            outputs = []
            for args, kwargs in calls:
                one = [a[n:n + 1] for a in args]
                out, _ = layer.stateless_call(weights, non_trainable, *one, **kwargs)
                outputs.append(out)
            return terms_fn(outputs)[0]  # [T]

        jacobian = jax.jacrev(terms)(trainable)  # one [T, *v.shape] a variable
        total = [s + np.sum(np.square(np.asarray(j)), axis=0)
                 for s, j in zip(total, jacobian)]
    return {v.path: s for v, s in zip(layer.trainable_variables, total)}


def _dense_two_calls():
    return L.Dense(3, activation="tanh"), [(5,), (5,)], {}


CASES = {
    "dense_flat": lambda: (L.Dense(3, activation="tanh"), [(5,)], {}),
    "dense_sequence": lambda: (L.Dense(3, activation="tanh"), [(4, 5)], {}),
    "dense_two_calls": _dense_two_calls,
    "einsum_dense_flat": lambda: (
        L.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c"), [(5,)], {}),
    "einsum_dense_sequence": lambda: (
        L.EinsumDense("abc,cd->abd", output_shape=(4, 3), bias_axes="d",
                      activation="tanh"), [(4, 5)], {}),
    "embedding": lambda: (L.Embedding(7, 3), [("ids", 6)], {}),
    "conv1d_same_strided": lambda: (
        L.Conv1D(3, 3, strides=2, padding="same", activation="tanh"), [(9, 2)], {}),
    "conv1d_causal_dilated": lambda: (
        L.Conv1D(3, 2, padding="causal", dilation_rate=2), [(8, 2)], {}),
    "conv2d_same": lambda: (
        L.Conv2D(3, (3, 2), strides=(2, 1), padding="same", activation="tanh"),
        [(7, 6, 2)], {}),
    "conv2d_groups_dilated": lambda: (
        L.Conv2D(4, 3, groups=2, dilation_rate=2), [(7, 7, 4)], {}),
    "conv3d": lambda: (L.Conv3D(2, 2, strides=2, padding="same"), [(5, 5, 4, 2)], {}),
    "conv3d_dilated": lambda: (L.Conv3D(2, 2, dilation_rate=2), [(5, 5, 5, 2)], {}),
    "conv1d_transpose": lambda: (
        L.Conv1DTranspose(3, 3, strides=2, padding="same"), [(5, 2)], {}),
    "conv2d_transpose": lambda: (
        L.Conv2DTranspose(3, 3, strides=2, activation="tanh"), [(4, 3, 2)], {}),
    "conv3d_transpose": lambda: (
        L.Conv3DTranspose(2, 2, strides=2, padding="same"), [(3, 3, 2, 2)], {}),
    "depthwise1d": lambda: (
        L.DepthwiseConv1D(3, strides=2, padding="same", depth_multiplier=2), [(9, 3)], {}),
    "depthwise2d_dilated": lambda: (
        L.DepthwiseConv2D(3, dilation_rate=2, depth_multiplier=2, activation="tanh"),
        [(7, 8, 2)], {}),
    "depthwise2d_strided": lambda: (
        L.DepthwiseConv2D(3, strides=2, padding="same"), [(7, 6, 3)], {}),
    "separable1d": lambda: (
        L.SeparableConv1D(4, 3, strides=2, padding="same", depth_multiplier=2),
        [(9, 3)], {}),
    "separable2d": lambda: (
        L.SeparableConv2D(4, 3, dilation_rate=2, activation="tanh"), [(7, 7, 2)], {}),
    "layer_norm": lambda: (L.LayerNormalization(), [(4, 5)], {}),
    "batch_norm_inference": lambda: (
        L.BatchNormalization(), [(4, 3)], {"training": False}),
    "group_norm": lambda: (L.GroupNormalization(groups=2), [(5, 4)], {}),
}


# Cases whose compiled kernel is run a second time, at new weights.
NEW_WEIGHTS = ("dense_flat", "separable2d", "batch_norm_inference")


def run_case(name):
    import jax

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    layer, shapes, kwargs = CASES[name]()
    inputs = []
    for shape in shapes:
        if shape[0] == "ids":  # repeated ids within an example, and across examples
            inputs.append(rng.integers(0, 7, size=(B, shape[1])).astype("int32"))
        else:
            inputs.append(rng.normal(size=(B, *shape)).astype("float32"))
    outputs = [layer(keras.ops.convert_to_tensor(x), **kwargs) for x in inputs]
    # Random weights everywhere: zero biases or unit moving statistics would hide terms.
    for v in layer.variables:
        value = rng.normal(size=v.shape)
        if "variance" in v.path:
            value = np.abs(value) + 0.5
        v.assign(value.astype(v.dtype))
    calls = [((keras.ops.convert_to_tensor(x),), kwargs) for x in inputs]
    w = [rng.normal(size=(T, *o.shape[1:])).astype("float32") for o in outputs]

    def terms_fn(outs):
        return sum(keras.ops.einsum("n...,t...->nt", keras.ops.cast(o, "float32"), wc)
                   for o, wc in zip(outs, w))

    kernel = kernels.lookup(layer)
    if kernel is None:
        return {"case": name, "error": f"no kernel covers {layer!r}"}
    expected = oracle(layer, calls, terms_fn)
    names = {v.path: n for n, v in kernel.params(layer).items()}
    result = {"case": name, "variables": {}, "covered": sorted(names),
              "trainable": sorted(expected)}
    default = _common.BUDGET
    compiled = {}
    for label, budget in (("whole", default), ("chunked", 1)):
        _common.BUDGET = budget
        try:
            compiled[label] = jax.jit(kernel_sum_squared(kernel, layer, calls, terms_fn))
            found = compiled[label]([v.value for v in layer.variables])
        finally:
            _common.BUDGET = default
        for path, name_ in names.items():
            got, want = np.asarray(found[name_]), expected[path]
            scale = float(np.max(np.abs(want)))
            entry = result["variables"].setdefault(path, {"scale": scale})
            entry[label] = float(np.max(np.abs(got - want))) / max(scale, 1e-30)
            entry["shape_ok"] = entry.get("shape_ok", True) and got.shape == want.shape
    if name in NEW_WEIGHTS:
        # The compiled function again, at other weights: they are its arguments, not
        # constants frozen when it was traced.
        for v in layer.variables:
            v.assign(np.abs(v.numpy()) * 1.5 + 0.25)
        again = oracle(layer, calls, terms_fn)
        found = compiled["whole"]([v.value for v in layer.variables])
        for path, name_ in names.items():
            got, want = np.asarray(found[name_]), again[path]
            scale = float(np.max(np.abs(want)))
            entry = result["variables"][path]
            entry["new_weights"] = float(np.max(np.abs(got - want))) / max(scale, 1e-30)
            entry["moved"] = float(np.max(np.abs(want - expected[path]))) / max(scale, 1e-30)
    return result


def main(names):
    if keras.backend.backend() != "jax":
        raise SystemExit(f"Expected KERAS_BACKEND=jax. Received: {keras.backend.backend()}")
    for name in names or CASES:
        try:
            result = run_case(name)
        except Exception as error:  # reported per case, so that one failure names itself
            result = {"case": name, "error": f"{type(error).__name__}: {error}"}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
