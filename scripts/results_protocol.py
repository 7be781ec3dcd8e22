"""The results protocol of van de Ven 2025 on full Fashion-MNIST, with keras-ewc.

"On the computation of the Fisher Information in continual learning": MLP 2×400 (ReLU),
Adam (lr 1e-3), batch 128, a fixed number of iterations per task, and for each method the
strength with the best average accuracy. Rows: None (fine-tuning), EWC with each Fisher
estimator (exact, sampled, empirical, batched), online EWC (exact Fisher, γ=1), joint
training on all tasks at once (the upper bound), and Kronecker-factored EWC (exact Fisher,
`structure="kronecker"`): `kronecker` keeps every task's factors (separate mode),
`kronecker-online` one nearest-Kronecker pair a layer (γ=1). Two protocols:

- `split`: 5 tasks of 2 classes, Task-IL (the other tasks' classes masked);
- `permuted`: 10 permutations (the first the identity), Domain-IL.

Each (method, strength) runs once per seed; the table gives the mean ± standard error of
the average accuracy over seeds, for the best strength per row (chosen on the mean; note
that this selects on test accuracy, as the paper's grid search on a validation set
would not).

The data is a directory of the four Fashion-MNIST IDX files (MNIST cannot be downloaded
here). The whole protocol, as in the paper (hours on CPU):

    python scripts/results_protocol.py /path/to/fashion-mnist --protocol split \
        --iterations 2000 --seeds 0,1,2 --steps-per-execution 50 --out results/split

Every run is added to OUT/runs.json as soon as it ends, so a killed sweep loses one run;
`--resume` skips the runs already there (to widen a grid or add a seed). Rows can be
split over processes with `--methods` and merged into one table with
`scripts/protocol_table.py`. The exact commands behind each published number are in
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import keras
import tensorflow as tf

import keras_ewc
from keras_ewc import continual
from scripts import protocol_table

ESTIMATOR_METHODS = ("exact", "sampled", "empirical", "batched")


def make_sequence(protocol: str, data, tasks: int | None):
    if protocol == "split":
        return continual.split_sequence(data, num_tasks=tasks or 5, scenario="task")
    return continual.permuted_sequence(data, num_tasks=tasks or 10, scenario="domain",
                                       seed=0)


def compiled(model, lr, steps_per_execution=1):
    # `steps_per_execution` only runs several batches per call into the graph: the updates,
    # their order and so the weights are the same as with 1 (tests/test_model.py).
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    return model


def run_sequential(sequence, seed, args, strength=None, estimator="exact", mode="separate",
                   structure="diagonal"):
    keras.utils.set_random_seed(seed)
    net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=(400, 400),
                        task_il=sequence.scenario == "task", seed=seed)
    extra = {} if structure == "diagonal" else {"structure": structure,
                                                "max_tasks": len(sequence)}
    model = net if strength is None else keras_ewc.EWCModel(net, strength=strength,
                                                             mode=mode, **extra)
    compiled(model, args.lr, args.steps_per_execution)
    return continual.train_sequence(
        model, sequence, steps_per_task=args.iterations, batch_size=args.batch_size,
        estimator=estimator, fisher_examples=args.fisher_examples, verbose=0, seed=seed)


def run_joint(sequence, seed, args):
    """Trains on all tasks at once; in Task-IL each example keeps its own task's mask."""
    keras.utils.set_random_seed(seed)
    net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=(400, 400),
                        task_il=sequence.scenario == "task", seed=seed)
    continual.set_active_classes(net, None)
    # Raw (uint8) inputs, scaled batch by batch: 10 permuted copies of Fashion-MNIST are
    # 470 MB as uint8 and 1.9 GB as float32.
    x = np.concatenate([t.raw_x_train for t in sequence])
    scale = np.float32(sequence[0].scale)
    y = np.concatenate([t.y_train for t in sequence]).astype(np.int32)
    masks = np.concatenate([np.repeat(sequence.active_mask(t.index)[None], len(t.y_train), 0)
                            for t in sequence])
    x_in = keras.Input(sequence.input_shape)
    m_in = keras.Input((sequence.num_outputs,))
    logits = net(x_in)
    masked = keras.layers.Lambda(
        lambda a: keras.ops.where(a[1] > 0, a[0], -1e9))([logits, m_in])
    joint = compiled(keras.Model([x_in, m_in], masked), args.lr, args.steps_per_execution)
    ds = (tf.data.Dataset.from_tensor_slices(((x, masks), y))
          .shuffle(len(y), seed=seed).repeat().batch(args.batch_size)
          .map(lambda xm, t: ((tf.cast(xm[0], tf.float32) * scale, xm[1]), t)))
    joint.fit(ds, steps_per_epoch=args.iterations * len(sequence), epochs=1, verbose=0,
              shuffle=False)
    accs = continual.evaluate_tasks(net, sequence)
    return continual.ContinualResults([accs], sequence.task_names)


def write_runs(path, args, runs):
    """Writes the runs so far atomically: a killed run never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--protocol", choices=["split", "permuted"], default="split")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=2000, help="batches per task")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strengths", default="1e0,1e1,1e2,1e3,1e4,1e5,1e6,1e7",
                        help="strengths swept for every EWC row")
    parser.add_argument("--fisher-examples", type=int, default=1000)
    parser.add_argument("--methods", default="none,exact,sampled,empirical,batched,online,joint")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="batches per call into the compiled graph (speed only)")
    parser.add_argument("--out", default="results/protocol")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUT/runs.json and skip them")
    args = parser.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]
    methods = args.methods.split(",")
    data = continual.load_dataset(args.data)
    sequence = make_sequence(args.protocol, data, args.tasks)
    os.makedirs(args.out, exist_ok=True)
    print(f"{sequence}; iterations {args.iterations}, seeds {seeds}", flush=True)
    runs_path = os.path.join(args.out, "runs.json")
    runs = []  # one record per (method, strength, seed)
    if args.resume and os.path.exists(runs_path):
        runs, settings = protocol_table.load_runs([runs_path])
        wanted = {k: vars(args)[k] for k in protocol_table.SETTINGS}
        if settings != wanted:
            raise ValueError(f"Cannot resume: {runs_path} was run with {settings}, this run "
                             f"asks for {wanted}. Use another --out.")
        print(f"resuming: {len(runs)} runs already in {runs_path}", flush=True)
    done = {(r["method"], r["strength"], r["seed"]) for r in runs}
    start = time.perf_counter()
    for method in methods:
        grid = [None] if method in ("none", "joint") else strengths
        for strength in grid:
            for seed in seeds:
                if (method, strength, seed) in done:
                    continue
                t0 = time.perf_counter()
                if method == "none":
                    res = run_sequential(sequence, seed, args)
                elif method == "joint":
                    res = run_joint(sequence, seed, args)
                elif method == "online":
                    res = run_sequential(sequence, seed, args, strength, "exact", "online")
                elif method in ("kronecker", "kronecker-online"):
                    mode = "online" if method == "kronecker-online" else "separate"
                    res = run_sequential(sequence, seed, args, strength, "exact", mode,
                                         structure="kronecker")
                elif method in ESTIMATOR_METHODS:
                    res = run_sequential(sequence, seed, args, strength, method)
                else:
                    raise ValueError(f"Unknown method {method!r}")
                runs.append({"method": method, "strength": strength, "seed": seed,
                             "average_accuracy": res.average_accuracy,
                             "accuracy_matrix": res.to_dict()["accuracy_matrix"],
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{method:9s} strength {strength!s:8s} seed {seed}: "
                      f"{res.average_accuracy:.4f} ({runs[-1]['seconds']} s)", flush=True)
                write_runs(runs_path, args, runs)  # after every run: a kill loses one run
    write_runs(runs_path, args, runs)
    selected = [r for r in runs if r["method"] in methods and r["seed"] in seeds
                and (r["strength"] is None or r["strength"] in strengths)]
    table = protocol_table.make_table(selected)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
