"""Learn task A, save, resume in a new process, learn task B, export, serve.

A continual learner outlives the process that trained it. This example:

1. learns task A and consolidates it, then saves the model to `learner.keras`;
2. starts a NEW Python process that loads `learner.keras` (no custom_objects: the
   keras_ewc classes are registered), learns task B with the penalty protecting A,
   consolidates B, and exports a SavedModel for serving;
3. loads the SavedModel with plain TensorFlow and predicts, and rebuilds a trainable
   EWCModel from it with `EWCModel.from_saved_model`.

The tasks are synthetic (two linear teachers that see the inputs through different
permutations), so it runs offline in seconds. Everything is written under --out:

    python examples/save_and_resume.py [--out DIR]    # default keras-ewc-out/save_and_resume

The last line printed is a JSON summary.
"""

import argparse
import json
import os
import subprocess
import sys

INPUTS, CLASSES = 20, 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join("keras-ewc-out", "save_and_resume"),
                        help="work directory: learner.keras, the served/ SavedModel, "
                             "expected.npy")
    parser.add_argument("workdir", nargs="?", default=None,
                        help="the work directory, given without --out (overrides --out)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs a task")
    # No default shown: the flag is absent unless given (hidden logs are the default).
    parser.add_argument("--tf-logs", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's start-up logs, which are hidden otherwise")
    # The second process: learns task B from the saved file (not for users).
    parser.add_argument("--task-b", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.out = args.workdir
    return args


def make_tasks(seed=3, n=1000):
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(INPUTS, CLASSES))
    xa = rng.normal(size=(n, INPUTS)).astype("float32")
    xb = rng.normal(size=(n, INPUTS)).astype("float32")
    perm = rng.permutation(INPUTS)
    return (xa, np.argmax(xa @ w, 1)), (xb, np.argmax(xb[:, perm] @ w, 1))


def accuracy(predict, x, y):
    import numpy as np

    return float(np.mean(np.argmax(np.asarray(predict(x)), axis=1) == y))


def quiet(model):
    return lambda x: model.predict(x, verbose=0)


def learn_task_a(workdir, epochs):
    import keras

    import keras_ewc

    keras.utils.set_random_seed(0)
    (xa, ya), _ = make_tasks()
    net = keras.Sequential([keras.Input((INPUTS,)),
                            keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(CLASSES)])
    model = keras_ewc.EWCModel(net, strength=30.0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(xa, ya, epochs=epochs, batch_size=64, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    model.save(os.path.join(workdir, "learner.keras"))
    print(f"task A learned: accuracy {accuracy(quiet(model), xa, ya):.2f}; "
          f"saved to {workdir}/learner.keras", file=sys.stderr)


def learn_task_b(workdir, epochs):
    """Runs in a new process: nothing of the first one survives but the file."""
    import keras
    import numpy as np

    import keras_ewc  # noqa: F401  (registers the classes that load_model meets)

    keras.utils.set_random_seed(1)
    (xa, ya), (xb, yb) = make_tasks()
    model = keras.models.load_model(os.path.join(workdir, "learner.keras"))
    assert int(model.regularizer.tasks.numpy()) == 1, "the state of task A was lost"
    model.fit(xb, yb, epochs=epochs, batch_size=64, verbose=0)
    model.consolidate((xb, yb), verbose=0)
    model.save(os.path.join(workdir, "learner.keras"))
    model.export(os.path.join(workdir, "served"))
    np.save(os.path.join(workdir, "expected.npy"), model.predict(xa[:100], verbose=0))
    print(f"task B learned in a new process: accuracy on B "
          f"{accuracy(quiet(model), xb, yb):.2f}, on A {accuracy(quiet(model), xa, ya):.2f}",
          file=sys.stderr)


def serve(workdir):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_ewc

    (xa, ya), (xb, yb) = make_tasks()
    served = tf.saved_model.load(os.path.join(workdir, "served"))
    predictions = served.serve(xa[:100]).numpy()
    expected = np.load(os.path.join(workdir, "expected.npy"))
    # Back to learning: the architecture plus the SavedModel give a trainable EWCModel.
    net = keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(CLASSES)])
    learner = keras_ewc.EWCModel.from_saved_model(os.path.join(workdir, "served"), net)
    return {
        "served_matches": bool(np.allclose(predictions, expected, rtol=1e-5, atol=1e-5)),
        "tasks": int(served.ewc_tasks[0].numpy()),
        "accuracy_a_after_b": accuracy(served.serve, xa, ya),
        "accuracy_b": accuracy(served.serve, xb, yb),
        "rebuilt_tasks": int(learner.regularizer.tasks.numpy()),
    }


def main(argv=None):
    args = parse_args(argv)
    # Imported after the arguments are read, so that --help answers at once; keras_ewc
    # before keras, so that TensorFlow starts quietly (--tf-logs shows its logs).
    import keras_ewc  # noqa: F401
    if args.task_b:
        learn_task_b(args.out, args.epochs)
        return
    os.makedirs(args.out, exist_ok=True)
    learn_task_a(args.out, args.epochs)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--task-b", "--out", args.out,
                    "--epochs", str(args.epochs)]
                   + (["--tf-logs"] if getattr(args, "tf_logs", False) else []),
                   check=True)
    print(json.dumps(serve(args.out)))


if __name__ == "__main__":
    main()
