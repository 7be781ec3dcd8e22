"""Learn task A, save, resume in a new process, learn task B, export, serve.

A continual learner outlives the process that trained it. This example:

1. learns task A and consolidates it, then saves the model to `learner.keras`;
2. starts a NEW Python process that loads `learner.keras` (no custom_objects: the
   keras_ewc classes are registered), learns task B with the penalty protecting A,
   consolidates B, and exports a SavedModel for serving;
3. loads the SavedModel with plain TensorFlow and predicts, and rebuilds a trainable
   EWCModel from it with `EWCModel.from_saved_model`.

The tasks are synthetic (two linear teachers that see the inputs through different
permutations), so it runs offline in seconds:

    python examples/save_and_resume.py [workdir]

The last line printed is a JSON summary.
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ewc  # noqa: E402

INPUTS, CLASSES = 20, 3


def make_tasks(seed=3, n=1000):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(INPUTS, CLASSES))
    xa = rng.normal(size=(n, INPUTS)).astype("float32")
    xb = rng.normal(size=(n, INPUTS)).astype("float32")
    perm = rng.permutation(INPUTS)
    return (xa, np.argmax(xa @ w, 1)), (xb, np.argmax(xb[:, perm] @ w, 1))


def accuracy(predict, x, y):
    return float(np.mean(np.argmax(np.asarray(predict(x)), axis=1) == y))


def quiet(model):
    return lambda x: model.predict(x, verbose=0)


def learn_task_a(workdir):
    keras.utils.set_random_seed(0)
    (xa, ya), _ = make_tasks()
    net = keras.Sequential([keras.Input((INPUTS,)),
                            keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(CLASSES)])
    model = keras_ewc.EWCModel(net, strength=30.0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(xa, ya, epochs=8, batch_size=64, verbose=0)
    model.consolidate((xa, ya), verbose=0)
    model.save(os.path.join(workdir, "learner.keras"))
    print(f"task A learned: accuracy {accuracy(quiet(model), xa, ya):.2f}; "
          f"saved to {workdir}/learner.keras", file=sys.stderr)


def learn_task_b(workdir):
    """Runs in a new process: nothing of the first one survives but the file."""
    keras.utils.set_random_seed(1)
    (xa, ya), (xb, yb) = make_tasks()
    model = keras.models.load_model(os.path.join(workdir, "learner.keras"))
    assert int(model.regularizer.tasks.numpy()) == 1, "the state of task A was lost"
    model.fit(xb, yb, epochs=8, batch_size=64, verbose=0)
    model.consolidate((xb, yb), verbose=0)
    model.save(os.path.join(workdir, "learner.keras"))
    model.export(os.path.join(workdir, "served"))
    np.save(os.path.join(workdir, "expected.npy"), model.predict(xa[:100], verbose=0))
    print(f"task B learned in a new process: accuracy on B "
          f"{accuracy(quiet(model), xb, yb):.2f}, on A {accuracy(quiet(model), xa, ya):.2f}",
          file=sys.stderr)


def serve(workdir):
    import tensorflow as tf

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


def main(argv):
    if len(argv) > 2 and argv[1] == "--task-b":
        learn_task_b(argv[2])
        return
    workdir = argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="keras_ewc_")
    os.makedirs(workdir, exist_ok=True)
    learn_task_a(workdir)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--task-b", workdir],
                   check=True)
    print(json.dumps(serve(workdir)))


if __name__ == "__main__":
    main(sys.argv)
