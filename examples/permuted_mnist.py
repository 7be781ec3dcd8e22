"""Permuted MNIST (Domain-IL): fine-tuning against EWC, with the accuracy matrix.

Runs offline on the Fashion-MNIST subset bundled with keras-ewc; `--dataset mnist` uses
TensorFlow Datasets' MNIST (downloaded once, network needed), and `--dataset DIR` a
directory of MNIST-format IDX files.

    python examples/permuted_mnist.py                       # bundled data, 5 tasks
    python examples/permuted_mnist.py --dataset mnist --tasks 10 --steps 1000
"""

import argparse

import keras

import keras_ewc
from keras_ewc import continual


def build(sequence, hidden, strength=None):
    net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=hidden, seed=0)
    model = net if strength is None else keras_ewc.EWCModel(net, strength=strength)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bundled",
                        help="'bundled' (default), 'mnist' (TFDS) or an IDX directory")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="batches per task")
    parser.add_argument("--strength", type=float, default=1000.0)
    parser.add_argument("--estimator", default="exact")
    parser.add_argument("--hidden", type=int, nargs="+", default=[400, 400])
    parser.add_argument("--plot", default="permuted.png")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    sequence = continual.permuted_sequence(args.dataset, num_tasks=args.tasks,
                                           scenario="domain", seed=0)
    print(sequence)
    results = []
    for label, strength in [("fine-tuning", None), (f"EWC λ={args.strength:g}", args.strength)]:
        model = build(sequence, args.hidden, strength)
        results.append(continual.train_sequence(
            model, sequence, steps_per_task=args.steps, estimator=args.estimator,
            label=label))
    print(continual.results_table(results))
    continual.plot_results(results, args.plot, title=str(sequence))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
