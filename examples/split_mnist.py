"""Split MNIST in the three scenarios (Task-IL, Domain-IL, Class-IL): fine-tuning vs EWC.

Five tasks of two classes each. In Task-IL the model is told the task and chooses
between its two classes (an `ActiveClassMask` on the logits, set per task, so training,
the Fisher and the predictions see only those classes); in Domain-IL it answers "first
or second class of the task" without being told which task; in Class-IL it must choose
among all ten classes. EWC helps a lot in Task-IL, less in Domain-IL, and hardly at all
in Class-IL (van de Ven & Tolias, "Three scenarios for continual learning").

Runs offline on the bundled Fashion-MNIST subset; `--dataset mnist` uses TFDS' MNIST.

    python examples/split_mnist.py                          # all three scenarios
    python examples/split_mnist.py --scenario task --dataset mnist --steps 2000
"""

import argparse

import keras

import keras_ewc
from keras_ewc import continual


def run(sequence, strength, steps, estimator, label):
    keras.utils.set_random_seed(0)
    net = continual.mlp(sequence.input_shape, sequence.num_outputs, hidden=(400, 400),
                        task_il=sequence.scenario == "task", seed=0)
    model = net if strength is None else keras_ewc.EWCModel(net, strength=strength)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return continual.train_sequence(model, sequence, steps_per_task=steps,
                                    estimator=estimator, label=label, verbose=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="bundled",
                        help="'bundled' (default), 'mnist' (TFDS) or an IDX directory")
    parser.add_argument("--scenario", default="all", choices=["all", "task", "domain", "class"])
    parser.add_argument("--steps", type=int, default=300, help="batches per task")
    parser.add_argument("--strength", type=float, default=1e4)
    parser.add_argument("--estimator", default="exact")
    parser.add_argument("--plot", default="split_{scenario}.png")
    args = parser.parse_args()

    data = continual.load_dataset(args.dataset)
    scenarios = ["task", "domain", "class"] if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        sequence = continual.split_sequence(data, num_tasks=5, scenario=scenario)
        print(f"\n{scenario.capitalize()}-IL: {sequence}")
        results = [
            run(sequence, None, args.steps, args.estimator, "fine-tuning"),
            run(sequence, args.strength, args.steps, args.estimator,
                f"EWC λ={args.strength:g}"),
        ]
        print(continual.results_table(results))
        path = args.plot.format(scenario=scenario)
        continual.plot_results(results, path, title=f"Split {data.name}, {scenario}-IL")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
