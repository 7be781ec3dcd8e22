"""Permuted MNIST (Domain-IL): fine-tuning against EWC, with the accuracy matrix.

Every task shows the same digits (or clothes) through its own fixed permutation of the
pixels, and one shared output layer answers all of them. A network fine-tuned on each task
in turn forgets the earlier ones; EWC keeps most of them.

Runs offline on the Fashion-MNIST subset bundled with keras-ewc; `--dataset mnist` uses
TensorFlow Datasets' MNIST (downloaded once, network needed), and `--dataset DIR` a
directory of MNIST-format IDX files. Writes results.json, results.csv and accuracy.png
under --out.

    python examples/permuted_mnist.py                       # bundled data, 5 tasks
    python examples/permuted_mnist.py --dataset mnist --tasks 10 --steps 1000
"""

import argparse
import os


def widths(text):
    """`"400,400"` -> `[400, 400]`: comma-separated, as `keras-ewc --hidden` takes them."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths >= 1, e.g. 400,400. Received: {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="bundled",
                        help="'bundled' (offline), 'mnist' (TFDS) or a directory of IDX files")
    parser.add_argument("--tasks", type=int, default=5, help="number of permuted tasks")
    parser.add_argument("--steps", type=int, default=400, help="training batches per task")
    parser.add_argument("--strength", type=float, default=1000.0, help="EWC strength λ")
    parser.add_argument("--estimator", default="exact",
                        help="Fisher estimator: exact, sampled, empirical or batched")
    parser.add_argument("--fisher-examples", type=int, default=300,
                        help="examples of each task used for the Fisher")
    parser.add_argument("--hidden", type=widths, default="400,400",
                        help="hidden layer widths of the MLP, comma-separated (as for "
                             "keras-ewc)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    parser.add_argument("--out", default=os.path.join("keras-ewc-out", "permuted_mnist"),
                        help="directory for results.json, results.csv and accuracy.png")
    # No default shown: the flag is absent unless given (hidden logs are the default).
    parser.add_argument("--tf-logs", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's start-up logs, which are hidden otherwise")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Imported after the arguments are read, so that --help answers at once; keras_ewc
    # before keras, so that TensorFlow starts quietly (--tf-logs shows its logs).
    import keras_ewc
    from keras_ewc import continual

    # isort: split
    import keras

    sequence = continual.permuted_sequence(args.dataset, num_tasks=args.tasks,
                                           scenario="domain", seed=args.seed)
    print(sequence.title)
    results = []
    for label, strength in [("fine-tuning", None), (f"EWC λ={args.strength:g}", args.strength)]:
        keras.utils.set_random_seed(args.seed)
        net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=args.hidden,
                            seed=args.seed)
        model = net if strength is None else keras_ewc.EWCModel(net, strength=strength)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        results.append(continual.train_sequence(
            model, sequence, steps_per_task=args.steps, estimator=args.estimator,
            fisher_examples=args.fisher_examples, seed=args.seed, label=label))
    print(continual.results_table(results, footnote=True))
    os.makedirs(args.out, exist_ok=True)
    continual.save_results(results, json_path=os.path.join(args.out, "results.json"),
                           csv_path=os.path.join(args.out, "results.csv"))
    plot = continual.plot_results(results, os.path.join(args.out, "accuracy.png"),
                                  title=sequence.title)
    print(f"Wrote {args.out}/results.json, results.csv and {os.path.basename(plot)}")


if __name__ == "__main__":
    main()
