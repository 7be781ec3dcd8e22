"""The Fisher engine on the models users bring: a zoo of keras.applications, recurrent,
attention, KerasHub and less common convolution models, at small sizes.

For each model, in a process of its own (so that its peak memory is its own):

- params, the layer kinds that hold trainable variables, and how many variables take
  each path of the engine (`"fast"`: a kernel; `"layer-local"`, where the engine has
  it; `"reference"`: the whole-network per-example path);
- the oracle error: the exact Fisher of `fisher_diagonal` on 8 examples against a
  brute-force one (one example and one class at a time, each with its own tape),
  as max |a − e| / max |e| over the variables;
- first call: `fisher_diagonal(exact)` on the data in a fresh process (traces included)
  against the first call of a traced batched gradient step over the same data;
- `fisher_diagonal` (empirical, sampled, exact) as users call it, on a `tf.data.Dataset`
  of `--examples` examples in batches of `--batch-size`, as a multiple of one batched
  gradient pass over the same dataset: the median over `--repeats` rounds of the ratio
  within a round, wall time and (in parentheses) process CPU time;
- peak RSS after the gradient passes and after the Fisher calls.

The targets of issue 18 (quiet machine): empirical and sampled ≤ 2×, exact ≤ max(3, C)×
(C classes) one batched gradient pass, and no variable on the reference path.

Run: `PYTHONPATH=. python benchmarks/model_zoo.py` (`--models MobileNetV2,LSTM` for some;
`--quick` for a smoke run; `--list` for the names). KerasHub models need `keras-hub`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ESTIMATORS = ("empirical", "sampled", "exact")


# --- the models: each returns (model, make_x(rng, n), classes) ---------------------------

def _applications(name):
    def build():
        import keras

        cls = getattr(keras.applications, name)
        kwargs = {"alpha": 0.35} if name == "MobileNetV2" else {}
        net = cls(weights=None, input_shape=(64, 64, 3), classes=10,
                  classifier_activation=None, **kwargs)
        return net, lambda rng, n: rng.normal(size=(n, 64, 64, 3)).astype("float32"), 10
    return build


def _tokens(vocab, length):
    return lambda rng, n: rng.integers(1, vocab, size=(n, length)).astype("int32")


def _recurrent(kind):
    def build():
        import keras

        layer = {
            "LSTM": lambda: keras.layers.LSTM(32),
            "GRU": lambda: keras.layers.GRU(32),
            "Bidirectional LSTM": lambda: keras.layers.Bidirectional(keras.layers.LSTM(16)),
        }[kind]()
        net = keras.Sequential([
            keras.Input((24,), dtype="int32"),
            keras.layers.Embedding(1000, 32, mask_zero=True),
            layer,
            keras.layers.Dense(4),
        ])
        return net, _tokens(1000, 24), 4
    return build


def transformer():
    import keras

    tokens = keras.Input((32,), dtype="int32")
    h = keras.layers.Embedding(1000, 64)(tokens)
    a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(128, activation="gelu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(64)(f))
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, out), _tokens(1000, 32), 4


def bert():
    import keras
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=1000, num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=32)
    inputs = {"token_ids": keras.Input((32,), dtype="int32", name="token_ids"),
              "segment_ids": keras.Input((32,), dtype="int32", name="segment_ids"),
              "padding_mask": keras.Input((32,), dtype="int32", name="padding_mask")}
    out = keras.layers.Dense(4)(backbone(inputs)["pooled_output"])
    net = keras.Model(inputs, out)

    def make_x(rng, n):
        return {"token_ids": rng.integers(1, 1000, size=(n, 32)).astype("int32"),
                "segment_ids": (rng.uniform(size=(n, 32)) < 0.5).astype("int32"),
                "padding_mask": (rng.uniform(size=(n, 32)) < 0.9).astype("int32")}
    return net, make_x, 4


def gpt2():
    import keras
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=1000, num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=32)
    inputs = {"token_ids": keras.Input((32,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((32,), dtype="int32", name="padding_mask")}
    h = backbone(inputs)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h))
    net = keras.Model(inputs, out)

    def make_x(rng, n):
        return {"token_ids": rng.integers(1, 1000, size=(n, 32)).astype("int32"),
                "padding_mask": (rng.uniform(size=(n, 32)) < 2).astype("int32")}
    return net, make_x, 4


def autoencoder():
    import keras

    x = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(h)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    return (keras.Model(x, out),
            lambda rng, n: rng.normal(size=(n, 32, 32, 3)).astype("float32"), 10)


def conv3d():
    import keras

    net = keras.Sequential([
        keras.Input((12, 12, 12, 1)),
        keras.layers.Conv3D(8, 3, activation="relu"),
        keras.layers.Conv3D(16, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling3D(),
        keras.layers.Dense(10),
    ])
    return net, lambda rng, n: rng.normal(size=(n, 12, 12, 12, 1)).astype("float32"), 10


def groupnorm():
    import keras

    net = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same"),
        keras.layers.GroupNormalization(groups=8),
        keras.layers.Activation("relu"),
        keras.layers.Conv2D(32, 3, strides=2),
        keras.layers.GroupNormalization(groups=4),
        keras.layers.Activation("relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    return net, lambda rng, n: rng.normal(size=(n, 32, 32, 3)).astype("float32"), 10


MODELS = {
    "MobileNetV2": _applications("MobileNetV2"),
    "EfficientNetB0": _applications("EfficientNetB0"),
    "ResNet50": _applications("ResNet50"),
    "DenseNet121": _applications("DenseNet121"),
    "ConvNeXtTiny": _applications("ConvNeXtTiny"),
    "LSTM": _recurrent("LSTM"),
    "GRU": _recurrent("GRU"),
    "Bidirectional LSTM": _recurrent("Bidirectional LSTM"),
    "Transformer": transformer,
    "BERT (KerasHub)": bert,
    "GPT-2 (KerasHub)": gpt2,
    "Conv2DTranspose autoencoder": autoencoder,
    "Conv3D": conv3d,
    "GroupNorm": groupnorm,
}


# --- one model, in this process -----------------------------------------------------------

def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _oracle_exact(model, variables, x):
    """Brute force: F = (1/N) Σ_n Σ_c p_c (∇ log p_c)², one example and class a tape."""
    import numpy as np
    import tensorflow as tf

    n = len(tf.nest.flatten(x)[0])
    total = [np.zeros(v.shape, np.float64) for v in variables]
    for i in range(n):
        xi = tf.nest.map_structure(lambda t, i=i: t[i:i + 1], x)
        probs = np.asarray(tf.nn.softmax(model(xi, training=False))[0], np.float64)
        for c in range(probs.shape[-1]):
            with tf.GradientTape() as tape:
                logp = tf.nn.log_softmax(model(xi, training=False))[0, c]
            grads = tape.gradient(logp, variables)
            for k, g in enumerate(grads):
                if g is not None:
                    total[k] += probs[c] * np.asarray(tf.convert_to_tensor(g), np.float64) ** 2
    return [t / n for t in total]


def measure(name, examples, batch_size, repeats, oracle_examples):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_ewc import _private, fisher_diagonal
    from keras_ewc.fisher import likelihoods

    keras.utils.set_random_seed(0)
    model, make_x, classes = MODELS[name]()
    rng = np.random.default_rng(0)
    x = make_x(rng, examples)
    y = rng.integers(0, classes, size=examples).astype("int32")
    variables = model.trainable_variables
    kinds = sorted({type(layer).__name__ for layer in _private.flatten_layers(model)
                    if any(v.path.rsplit("/", 1)[0] == layer.path
                           for v in layer.trainable_weights)})
    lik = likelihoods.Categorical(from_logits=True)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    row = {"model": name, "classes": classes,
           "params": int(sum(np.prod(v.shape) for v in variables)), "kinds": kinds}

    @tf.function(reduce_retracing=True)
    def grad(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(lik.nll(model(xb, training=False), yb))
        return tape.gradient(loss, variables)

    def unit():
        out = None
        for xb, yb in dataset:
            out = grad(xb, yb)
        return out

    def call(estimator, **kwargs):
        return lambda: fisher_diagonal(model, dataset, estimator=estimator,
                                       likelihood="categorical", verbose=0, **kwargs)

    def timed(fn):
        start, start_cpu = time.perf_counter(), time.process_time()
        for t in tf.nest.flatten(fn()):
            np.asarray(t)
        return time.perf_counter() - start, time.process_time() - start_cpu

    row["first_grad_s"] = timed(unit)[0]
    row["rss_grad_mb"] = _peak_mb()
    start = time.perf_counter()
    _, paths = fisher_diagonal(model, dataset, estimator="exact", likelihood="categorical",
                               verbose=0, return_paths=True)
    row["first_fisher_s"] = time.perf_counter() - start
    counts = {}
    for path in paths.values():
        counts[path] = counts.get(path, 0) + 1
    row["paths"] = counts
    fns = {"unit": unit, **{e: call(e) for e in ESTIMATORS}}
    for fn in fns.values():  # each traced once more at most before timing
        fn()
    ratios = {e: [] for e in ESTIMATORS}
    cpu_ratios = {e: [] for e in ESTIMATORS}
    units = []
    for _ in range(repeats):
        times = {key: timed(fn) for key, fn in fns.items()}
        units.append(times["unit"][0])
        for e in ESTIMATORS:
            ratios[e].append(times[e][0] / times["unit"][0])
            cpu_ratios[e].append(times[e][1] / times["unit"][1])
    row["grad_s"] = min(units)
    row["ratios"] = {e: [float(np.median(ratios[e])), float(np.median(cpu_ratios[e]))]
                     for e in ESTIMATORS}
    row["rss_fisher_mb"] = _peak_mb()
    if oracle_examples:
        xs = tf.nest.map_structure(lambda t: t[:oracle_examples], x)
        ours = fisher_diagonal(model, xs, estimator="exact", likelihood="categorical",
                               verbose=0)
        expected = _oracle_exact(model, variables, xs)
        scale = max(float(np.abs(e).max()) for e in expected)
        row["oracle_error"] = max(
            float(np.abs(np.asarray(a, np.float64) - e).max()) for a, e in zip(ours, expected)
        ) / max(scale, 1e-30)
    return row


# --- the table ----------------------------------------------------------------------------

def _format(row):
    if "error" in row:
        return f"| {row['model']} | failed: {row['error']} |"
    paths = ", ".join(f"{k} {v}" for k, v in sorted(row["paths"].items()))
    r = row["ratios"]
    target_exact = max(3, row["classes"])
    ok = (all(r[e][0] <= 2 for e in ("empirical", "sampled")) and r["exact"][0] <= target_exact
          and "reference" not in row["paths"])
    oracle = f"{row['oracle_error']:.1e}" if "oracle_error" in row else "—"
    return (
        f"| {row['model']} | {row['params']:,} | {', '.join(row['kinds'])} | {paths} "
        f"| {oracle} | {row['first_fisher_s']:.1f} / {row['first_grad_s']:.1f} "
        f"| {r['empirical'][0]:.2f} ({r['empirical'][1]:.2f}) "
        f"| {r['sampled'][0]:.2f} ({r['sampled'][1]:.2f}) "
        f"| {r['exact'][0]:.2f} ({r['exact'][1]:.2f}) "
        f"| {row['rss_grad_mb']:,.0f} / {row['rss_fisher_mb']:,.0f} | {'yes' if ok else 'no'} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--oracle-examples", type=int, default=8,
                        help="examples for the brute-force check (0: skip it)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds a model may take before it is reported as failed")
    parser.add_argument("--quick", action="store_true", help="64 examples, 1 round")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model
    args = parser.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return
    if args.quick:
        args.examples, args.repeats = 64, 1
    if args.one:
        row = measure(args.one, args.examples, args.batch_size, args.repeats,
                      args.oracle_examples)
        print("ROW " + json.dumps(row))
        return
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected names from: {list(MODELS)}")
    import keras
    import tensorflow as tf

    print(f"{args.examples} examples in batches of {args.batch_size}, {args.repeats} "
          f"round(s), tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| model | params | layer kinds with weights | variables by path "
          "| oracle error (exact, 8 ex.) | first call s: Fisher exact / gradient "
          "| empirical × grad | sampled × grad | exact × grad "
          "| peak RSS MB: gradient / Fisher | targets met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--examples", str(args.examples),
                   "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                   "--oracle-examples", str(args.oracle_examples)]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
            if lines:
                row = json.loads(lines[-1][4:])
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": name, "error": tail[:200]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"over {args.timeout:.0f} s"}
        print(_format(row), flush=True)


if __name__ == "__main__":
    main()
