"""What online Kronecker EWC's nearest Kronecker product costs in accuracy of the precision.

An MLP (784-400-400-10 by default) learns permuted Fashion-MNIST tasks one after another
(bundled subset by default; `--data DIR` for the full IDX files); after each task the
exact-Fisher factors of that task are computed on `--fisher-examples` training examples.
Two precisions are kept side by side, per layer:

- the exact sum `Σ_k γ^(T−k) A_k ⊗ G_k` (what separate mode holds, for γ = 1),
- online: one pair, `A ⊗ G ← NKP(γ A ⊗ G + A_new ⊗ G_new)` after every task
  (`keras_ewc.kronecker.merge_online`).

After each task it prints, per layer: the relative Frobenius error of this merge (what
`KroneckerRegularizer.last_merge_errors` records), the relative Frobenius error of the
online pair against the exact sum so far, and the relative error of the penalty
`½ vec(Δ)ᵀ P vec(Δ)` for random Δ (Gaussian, 20 draws: mean and max) and for the real
Δ the weights moved during the task (anchor = the previous task's end).

Run: `PYTHONPATH=. python benchmarks/kronecker_online_error.py [--tasks 5 --steps 300]`.
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf

from keras_ewc import continual
from keras_ewc import kronecker as kron
from keras_ewc.fisher import kronecker as kfac


def frobenius_error(pairs, a, g) -> float:
    """‖Σ_k A_k ⊗ G_k − A ⊗ G‖_F / ‖Σ_k A_k ⊗ G_k‖_F, from Gram matrices (float64)."""
    ext_a = [tf.cast(x, tf.float64) for x, _ in pairs] + [-tf.cast(a, tf.float64)]
    ext_g = [tf.cast(y, tf.float64) for _, y in pairs] + [tf.cast(g, tf.float64)]
    full = np.sum(kron._gram(ext_a) * kron._gram(ext_g))
    k = len(pairs)
    total = np.sum(kron._gram(ext_a[:k]) * kron._gram(ext_g[:k]))
    return float(np.sqrt(max(full, 0.0) / total))


def penalty(pairs, delta) -> float:
    delta = tf.constant(delta, tf.float32)
    return float(sum(kron.kronecker_quadratic(a, g, delta) for a, g in pairs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="batches of 128 a task")
    parser.add_argument("--fisher-examples", type=int, default=1000)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--hidden", default="400,400")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    seq = continual.permuted_sequence(continual.load_dataset(args.data), args.tasks)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    net = continual.mlp(seq.input_shape, seq.num_outputs, hidden=hidden, seed=0)
    net.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layers = kfac.factored_layers(net)
    exact = [[] for _ in layers]      # every task's pair, decayed
    online = [None for _ in layers]
    rng = np.random.default_rng(0)
    previous = None
    print("| after task | layer | merge error | online vs exact sum (Frobenius) "
          "| penalty error, random Δ (mean / max) | penalty error, real Δ |")
    print("|---|---|---|---|---|---|")
    for task in seq:
        x, y = task.x_train, task.y_train
        train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=0)
        net.fit(train.repeat().batch(128), epochs=1, steps_per_epoch=args.steps, verbose=0)
        wbars = [kron.augment(p["kernel"], p.get("bias")) for _, _, p in layers]
        factors = kfac.compute_factors(net, layers, x[: args.fisher_examples],
                                       likelihood="categorical", verbose=0)
        for i, ((layer, _, _), (a, g)) in enumerate(zip(layers, factors)):
            real = None if previous is None else (wbars[i] - previous[i]).numpy()
            # The penalty the previous tasks put on the move this task made.
            if real is not None and exact[i]:
                p_exact = penalty(exact[i], real)
                p_online = penalty([online[i]], real)
                real_err = abs(p_online - p_exact) / p_exact
            else:
                real_err = float("nan")
            exact[i] = [(args.gamma * ea, eg) for ea, eg in exact[i]] + [(a, g)]
            if online[i] is None:
                online[i], merge = (a, g), 0.0
            else:
                oa, og, merge = kron.merge_online(*online[i], a, g, args.gamma)
                online[i] = (oa, og)
            errors = []
            for _ in range(20):
                delta = rng.normal(size=wbars[i].shape).astype("float32")
                p_exact = penalty(exact[i], delta)
                errors.append(abs(penalty([online[i]], delta) - p_exact) / p_exact)
            frob = frobenius_error(exact[i], *online[i])
            print(f"| {task.index} | {layer.name} | {merge:.4f} | {frob:.4f} | "
                  f"{np.mean(errors):.4f} / {np.max(errors):.4f} | {real_err:.4f} |",
                  flush=True)
        previous = wbars


if __name__ == "__main__":
    main()
