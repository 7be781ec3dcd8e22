"""Split MNIST in the three scenarios (Task-IL, Domain-IL, Class-IL): fine-tuning vs EWC.

Five tasks of two classes each. In Task-IL the model is told the task and chooses
between its two classes (an `ActiveClassMask` on the logits, set per task, so training,
the Fisher and the predictions see only those classes); in Domain-IL it answers "first
or second class of the task" without being told which task; in Class-IL it must choose
among all ten classes. EWC helps a lot in Task-IL, little in Domain-IL, and hardly at all
in Class-IL: that is what the literature finds (van de Ven, Tuytelaars & Tolias, "Three
types of incremental learning", 2022), and the script says so next to the numbers.

Runs offline on the bundled Fashion-MNIST subset; `--dataset mnist` uses TFDS' MNIST.
Writes, per scenario, <scenario>/results.json, results.csv and accuracy.png under --out.

    python examples/split_mnist.py                          # all three scenarios
    python examples/split_mnist.py --scenario task --dataset mnist --steps 2000
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
    parser.add_argument("--scenario", default="all", choices=["all", "task", "domain", "class"],
                        help="which scenario to run")
    parser.add_argument("--steps", type=int, default=300, help="training batches per task")
    parser.add_argument("--strength", type=float, default=1e4, help="EWC strength λ")
    parser.add_argument("--estimator", default="exact",
                        help="Fisher estimator: exact, sampled, empirical or batched")
    parser.add_argument("--fisher-examples", type=int, default=1000,
                        help="examples of each task used for the Fisher")
    parser.add_argument("--hidden", type=widths, default="400,400",
                        help="hidden layer widths of the MLP, comma-separated (as for "
                             "keras-ewc)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    parser.add_argument("--out", default=os.path.join("keras-ewc-out", "split_mnist"),
                        help="directory for one sub-directory of results a scenario")
    # No default shown: the flag is absent unless given (hidden logs are the default).
    parser.add_argument("--tf-logs", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's start-up logs, which are hidden otherwise")
    return parser.parse_args(argv)


def run(sequence, strength, args, label):
    import keras

    import keras_ewc
    from keras_ewc import continual

    keras.utils.set_random_seed(args.seed)
    net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=args.hidden,
                        task_il=sequence.scenario == "task", seed=args.seed)
    model = net if strength is None else keras_ewc.EWCModel(net, strength=strength)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return continual.train_sequence(model, sequence, steps_per_task=args.steps,
                                    estimator=args.estimator,
                                    fisher_examples=args.fisher_examples, seed=args.seed,
                                    label=label, verbose=1)


def main(argv=None):
    args = parse_args(argv)
    # Imported after the arguments are read, so that --help answers at once.
    from keras_ewc import continual
    from keras_ewc.cli import little_gain_note

    data = continual.load_dataset(args.dataset)
    scenarios = ["task", "domain", "class"] if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        sequence = continual.split_sequence(data, num_tasks=5, scenario=scenario)
        print(f"\n{sequence.title}")
        results = [run(sequence, None, args, "fine-tuning"),
                   run(sequence, args.strength, args, f"EWC λ={args.strength:g}")]
        print(continual.results_table(results, footnote=True))
        gain = results[1].average_accuracy - results[0].average_accuracy
        print(little_gain_note(scenario, gain)
              or f"EWC gained {100 * gain:+.1f} points of average accuracy.")
        out = os.path.join(args.out, scenario)
        os.makedirs(out, exist_ok=True)
        continual.save_results(results, json_path=os.path.join(out, "results.json"),
                               csv_path=os.path.join(out, "results.csv"))
        continual.plot_results(results, os.path.join(out, "accuracy.png"), title=sequence.title)
        print(f"Wrote {out}/results.json, results.csv and accuracy.png")


if __name__ == "__main__":
    main()
