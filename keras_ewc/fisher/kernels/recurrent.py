"""LSTM, GRU and SimpleRNN: the recurrence re-run with each step's pre-activation exposed.

A recurrent layer applies the same linear maps at every step t: `x_t W` (its kernel),
`h_{t-1} U` (its recurrent kernel) and a bias, added to the gates' pre-activation. So
example n's gradient of W is Σ_t x[n, t] ⊗ g[n, t], of U Σ_t h[n, t-1] ⊗ g[n, t], of the
bias Σ_t g[n, t], with g the gradient at step t's pre-activation; each is summed over the
steps (and the layer's calls) before squaring (`dense.kernel_sum_squared`).

`forward` makes a zero probe `z` (`[B, steps, gates]`), and `finish` re-runs the
recurrence with the cell's own maths (Keras' `LSTMCell`, `GRUCell`, `SimpleRNNCell`:
gate order, activations, biases; inference mode, so no dropout), adding `z[:, t]` to
step t's pre-activation, and returns what the layer returns (`return_sequences`,
`return_state`, `go_backwards`, masks, `initial_state`). The gradient at `z[:, t]` is
then the gradient at step t's pre-activation; a masked step keeps the previous state and
output, so its gradient is zero. The inputs' projection `x W + b` is one matmul over all
steps; only `h_{t-1} U` runs inside the loop (on TensorFlow a `tf.while_loop`, as Keras'
own layers run there: TF-only code, marked; `keras.ops.scan` on other backends). The
forward pass and the loop are keras.ops; the sums use the Dense kernel's helpers.

GRU: with `reset_after=True` the reset gate multiplies `h_{t-1} U_h + b_h` after the
matmul, so the recurrent pre-activation has its own gradient: the probe holds 6 units
a step, the input side's 3 then the recurrent side's 3 (bias row 0 and row 1). Each
gate's units are in Keras' order: LSTM i, f, c, o; GRU z, r, h. With
`reset_after=False` the candidate's recurrent input is `r_t ∘ h_{t-1}`, recorded as such.

Not covered (the layer-local path keeps these exact): cells other than Keras' own (a
subclass, or `keras.layers.RNN` around a cell), a layer subclass overriding `call` or
`inner_loop`, stateful layers, mixed precision, a call in training mode with dropout.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_ewc.fisher.kernels._common import broadcast_sum_squared
from keras_ewc.fisher.kernels._registry import Kernel, register_kernel
from keras_ewc.fisher.kernels.dense import kernel_sum_squared

L = keras.layers


def _stop(variable, dtype):
    return ops.stop_gradient(ops.cast(ops.convert_to_tensor(variable), dtype))


def _where(mask, new, old):
    return ops.where(mask, new, old)


def _scan(body, init, xs):
    """`(final carry, every step's carry stacked)` of `carry = body(carry, xs[:, t])`
    over the leading (time) axis of the tensors `xs`."""
    if keras.backend.backend() != "tensorflow":
        def step(carry, inputs):
            carry = body(carry, inputs)
            return carry, carry
        return ops.scan(step, init, xs)
    # TensorFlow only: a while loop carrying the states as loop variables, with tensor
    # arrays for the steps, as Keras' own recurrent layers run on TF; `keras.ops.scan`
    # keeps its carry in tensor arrays too and cost ~1.3-1.5x this here (CPU,
    # forward and backward of a masked LSTM(32), 32 steps, batch 128).
    import tensorflow as tf

    steps = xs[0].shape[0] if xs[0].shape[0] is not None else tf.shape(xs[0])[0]
    inputs = [tf.TensorArray(t.dtype, size=steps).unstack(t) for t in xs]
    outputs = [tf.TensorArray(c.dtype, size=steps, element_shape=c.shape) for c in init]

    def loop(t, outputs, *carry):
        carry = body(list(carry), [ta.read(t) for ta in inputs])
        return (t + 1, [ta.write(t, c) for ta, c in zip(outputs, carry)], *carry)

    _, outputs, *final = tf.while_loop(
        lambda t, *_: t < steps, loop, (tf.constant(0), outputs, *init),
        maximum_iterations=steps, parallel_iterations=32, swap_memory=True)
    return list(final), [ta.stack() for ta in outputs]


class _RecurrentKernel(Kernel):
    """What LSTM, GRU and SimpleRNN share: inputs, masks, the loop, the outputs."""

    cell_class: type = None

    def supports(self, layer) -> bool:
        cell = layer.cell
        return (type(cell) is self.cell_class  # a user's cell computes something else
                and not layer.stateful  # refused with an error elsewhere
                and cell.compute_dtype == cell.variable_dtype == "float32")

    def params(self, layer) -> dict:
        cell = layer.cell
        out = {"kernel": cell.kernel, "recurrent_kernel": cell.recurrent_kernel}
        if cell.bias is not None:
            out["bias"] = cell.bias
        return out

    def gates(self, layer) -> int:
        raise NotImplementedError

    def loop_inputs(self, layer, pre_x, z):
        """The `[B, steps, ...]` tensors each step reads: by default `x W + b + z`."""
        return [pre_x + z]

    def step(self, layer, w, inputs, states):
        """One step: `(output, new states)` from step t's `loop_inputs` and states."""
        raise NotImplementedError

    def forward(self, layer, args, kwargs):
        x = args[0]
        if len(args) > 4 or len(x.shape) != 3:
            return None
        # `call(sequences, initial_state=None, mask=None, training=False)`
        kwargs = {**dict(zip(("initial_state", "mask", "training"), args[1:])), **kwargs}
        cell = layer.cell
        training = kwargs.get("training", False)
        if (training is not False and training is not None
                and (cell.dropout or cell.recurrent_dropout)):
            return None  # dropout in training mode: not per-example maths we re-run
        initial_state = kwargs.get("initial_state")
        mask = kwargs.get("mask")
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        steps = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        z = ops.zeros((x.shape[0], steps, self.gates(layer)), x.dtype)
        record = {}

        def finish(z):
            return self._run(layer, x, z, initial_state, mask, record)

        return record, z, finish

    def _run(self, layer, x, z, initial_state, mask, record):
        cell = layer.cell
        dtype = x.dtype
        w = {name: _stop(v, dtype) for name, v in self.params(layer).items()}
        batch = x.shape[0]
        if initial_state is None:
            states = [ops.zeros((batch, d), dtype) for d in self._state_sizes(cell)]
        else:
            states = list(initial_state) if isinstance(initial_state, (list, tuple)) \
                else [initial_state]
            states = [ops.cast(s, dtype) for s in states]
        if layer.go_backwards:
            x = ops.flip(x, axis=1)
            if mask is not None:
                mask = ops.flip(mask, axis=1)
        pre_x = self.project(layer, w, x)  # [B, steps, gates]: x W + b, all steps at once
        # Time-major for the loop; the probe is added outside it, to all steps at once.
        xs = [ops.transpose(t, (1, 0, 2)) for t in self.loop_inputs(layer, pre_x, z)]
        count = len(xs)
        if mask is not None:
            mask = ops.cast(mask, "bool")
            if len(mask.shape) == 3:
                mask = mask[..., 0]
            xs.append(ops.transpose(mask, (1, 0))[..., None])
        zero_output = layer.zero_output_for_mask
        out0 = ops.zeros_like(states[0])
        # A masked step's output is the previous step's (zeros before the first) as
        # Keras runs it on TensorFlow, and unrolled on JAX; JAX's scan takes the
        # previous state h instead (the initial state before the first step).
        prev0 = (states[0] if keras.backend.backend() != "tensorflow" and not layer.unroll
                 else out0)

        def body(carry, inputs):
            prev_out, states = carry[0], list(carry[1:])
            output, new_states = self.step(layer, w, inputs[:count], states)
            if mask is not None:
                m = inputs[count]
                output = _where(m, output, out0 if zero_output else prev_out)
                new_states = [_where(m, s, p) for s, p in zip(new_states, states)]
            return [output] + list(new_states)

        final, per_step = _scan(body, [prev0] + states, xs)
        outputs, hs = per_step[0], per_step[1]  # [steps, B, units]
        # Values only: h_{t-1} is the state before step t (the initial state first).
        h_prev = ops.concatenate([states[0][None], hs[:-1]], axis=0)
        record["x"] = ops.stop_gradient(x)
        record["h"] = ops.stop_gradient(ops.transpose(h_prev, (1, 0, 2)))
        self.extra_records(layer, w, pre_x, record)

        output = ops.transpose(outputs, (1, 0, 2)) if layer.return_sequences else final[0]
        if layer.return_state:
            return (output, *final[1:])
        return output

    def _state_sizes(self, cell):
        size = cell.state_size
        return list(size) if isinstance(size, (list, tuple)) else [size]

    def project(self, layer, w, x):
        pre = ops.matmul(x, w["kernel"])
        return pre + w["bias"] if "bias" in w else pre

    def extra_records(self, layer, w, pre_x, record):
        pass

    def sum_squared(self, layer, records, grads) -> dict:
        # W and U see the same gradients: one product over [x_t, h_{t-1}], then split.
        inputs = int(records[0]["x"].shape[-1])
        both = kernel_sum_squared(
            [ops.concatenate([r["x"], r["h"]], axis=-1) for r in records], grads)
        out = {"kernel": both[:inputs], "recurrent_kernel": both[inputs:]}
        if layer.cell.bias is not None:
            out["bias"] = broadcast_sum_squared(grads, layer.cell.bias.shape)
        return out


@register_kernel(L.LSTM, methods=("inner_loop",))
class LSTMKernel(_RecurrentKernel):
    """`z = x W + h U + b` split i, f, c, o (Keras' fused `LSTMCell` maths)."""

    cell_class = L.LSTMCell

    def gates(self, layer) -> int:
        return 4 * layer.cell.units

    def step(self, layer, w, inputs, states):
        cell = layer.cell
        h, c = states
        pre = inputs[0] + ops.matmul(h, w["recurrent_kernel"])
        i, f, g, o = ops.split(pre, 4, axis=-1)
        i, f, o = (cell.recurrent_activation(t) for t in (i, f, o))
        c = f * c + i * cell.activation(g)
        h = o * cell.activation(c)
        return h, [h, c]


@register_kernel(L.SimpleRNN, methods=("inner_loop",))
class SimpleRNNKernel(_RecurrentKernel):
    """`h = activation(x W + b + h U)`."""

    cell_class = L.SimpleRNNCell

    def gates(self, layer) -> int:
        return layer.cell.units

    def step(self, layer, w, inputs, states):
        cell = layer.cell
        h = inputs[0] + ops.matmul(states[0], w["recurrent_kernel"])
        if cell.activation is not None:
            h = cell.activation(h)
        return h, [h]


@register_kernel(L.GRU, methods=("inner_loop",))
class GRUKernel(_RecurrentKernel):
    """Update, reset and candidate gates (Keras' `GRUCell`, `reset_after` either way)."""

    cell_class = L.GRUCell

    def gates(self, layer) -> int:
        # reset_after: the input side's 3 units, then the recurrent side's 3.
        return (6 if layer.cell.reset_after else 3) * layer.cell.units

    def project(self, layer, w, x):
        pre = ops.matmul(x, w["kernel"])
        if "bias" not in w:
            return pre
        return pre + (w["bias"][0] if layer.cell.reset_after else w["bias"])

    def loop_inputs(self, layer, pre_x, z):
        if not layer.cell.reset_after:
            return [pre_x + z]
        units = layer.cell.units
        return [pre_x + z[..., : 3 * units], z[..., 3 * units:]]

    def step(self, layer, w, inputs, states):
        cell = layer.cell
        units = cell.units
        h = states[0]
        u = w["recurrent_kernel"]
        if cell.reset_after:
            x_side, probe_h = inputs
            h_side = ops.matmul(h, u) + probe_h
            if "bias" in w:
                h_side = h_side + w["bias"][1]
            x_z, x_r, x_h = ops.split(x_side, 3, axis=-1)
            h_z, h_r, h_h = ops.split(h_side, 3, axis=-1)
            z = cell.recurrent_activation(x_z + h_z)
            r = cell.recurrent_activation(x_r + h_r)
            hh = cell.activation(x_h + r * h_h)
        else:
            x_z, x_r, x_h = ops.split(inputs[0], 3, axis=-1)
            inner = ops.matmul(h, u[:, : 2 * units])
            z = cell.recurrent_activation(x_z + inner[:, :units])
            r = cell.recurrent_activation(x_r + inner[:, units:])
            hh = cell.activation(x_h + ops.matmul(r * h, u[:, 2 * units:]))
        h = z * h + (1 - z) * hh
        return h, [h]

    def extra_records(self, layer, w, pre_x, record):
        cell = layer.cell
        if cell.reset_after:
            return
        # The candidate's recurrent input r_t ∘ h_{t-1}, from the recorded states (the
        # probe is zero, so the values equal the loop's).
        units = cell.units
        h = record["h"]
        pre_r = pre_x[..., units: 2 * units] + ops.matmul(
            h, w["recurrent_kernel"][:, units: 2 * units])
        record["rh"] = ops.stop_gradient(cell.recurrent_activation(pre_r) * h)

    def sum_squared(self, layer, records, grads) -> dict:
        cell = layer.cell
        units = cell.units
        xs = [r["x"] for r in records]
        hs = [r["h"] for r in records]
        if cell.reset_after:
            gx = [g[..., : 3 * units] for g in grads]
            gh = [g[..., 3 * units:] for g in grads]
            out = {"kernel": kernel_sum_squared(xs, gx),
                   "recurrent_kernel": kernel_sum_squared(hs, gh)}
            if cell.bias is not None:
                split = [ops.reshape(g, (g.shape[0], g.shape[1], -1, 2, 3 * units)) for g in grads]
                out["bias"] = broadcast_sum_squared(split, cell.bias.shape)
            return out
        # U's first 2 units a gate see h_{t-1}; the candidate's see r_t ∘ h_{t-1}.
        gzr = [g[..., : 2 * units] for g in grads]
        gh = [g[..., 2 * units:] for g in grads]
        out = {"kernel": kernel_sum_squared(xs, grads),
               "recurrent_kernel": ops.concatenate(
                   [kernel_sum_squared(hs, gzr),
                    kernel_sum_squared([r["rh"] for r in records], gh)], axis=1)}
        if cell.bias is not None:
            out["bias"] = broadcast_sum_squared(grads, cell.bias.shape)
        return out
