"""The `keras-ewc` command: a demo and strength sweeps on continual-learning benchmarks."""

from __future__ import annotations

import argparse
import os
import sys
import time

DEMO_STRENGTH = 1000.0
ESTIMATORS = ("exact", "sampled", "empirical", "batched")
# keras_ewc.continual.SEQUENCES, repeated here so that the command checks --sequence
# before TensorFlow loads (tests/test_cli.py holds the two equal).
SEQUENCES = ("permuted", "split", "rotated")


def _ewc_class():
    # Looked up at call time so that the command imports TensorFlow only when it runs.
    from keras_ewc import EWCModel

    return EWCModel


def _numbers(text: str, name: str, cast, minimum, kind: str, example: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"Expected {name} as comma-separated {kind}, e.g. {example}. Received: {text!r}"
        ) from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"Expected {name} >= {minimum} (at least one). Received: {text!r}")
    return values


def _floats(text: str, name: str) -> list[float]:
    return _numbers(text, name, float, 0, "numbers", "1e2,1e3")


def _ints(text: str, name: str) -> list[int]:
    return _numbers(text, name, int, 1, "integers", "400,400")


def _positive(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"Expected --{name} >= 1. Received: {value}")


# Measured with `time keras-ewc demo` on a 2-core CPU: 49 s lightly loaded, 141 s shared (README).
DEMO_DURATION = "1 to 2½ minutes"
LITTLE_GAIN = 0.03  # below this gain in average accuracy, say why EWC barely helps


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, and keeps the descriptions' line breaks."""

    def _get_help_string(self, action):
        # A flag's False, or a None that the help text explains, is not worth showing.
        if action.default is None or action.default is False or "(default" in (
                action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n".join(argparse.HelpFormatter._fill_text(self, part, width, indent)
                         for part in text.split("\n"))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-ewc", formatter_class=_HelpFormatter,
        description="Elastic Weight Consolidation for Keras: continual-learning demo and "
                    "benchmarks. TensorFlow's start-up logs are hidden; --tf-logs (or "
                    "KERAS_EWC_TF_LOGS=1) shows them.",
    )
    parser.add_argument("--tf-logs", action="store_true",
                        help="show TensorFlow's own start-up and C++ logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, tasks, steps, hidden, fisher):
        p.add_argument("--tasks", type=int, default=tasks, help="number of tasks")
        p.add_argument("--steps", type=int, default=steps, help="training batches per task")
        p.add_argument("--epochs", type=int, default=None,
                       help="train each task for this many epochs instead of --steps")
        p.add_argument("--batch-size", type=int, default=128, help="training batch size")
        p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
        p.add_argument("--hidden", default=hidden,
                       help="hidden layer widths of the MLP, comma-separated")
        p.add_argument("--fisher-examples", type=int, default=fisher,
                       help="examples of each task used for the Fisher")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the weights, the permutations and the shuffling")
        p.add_argument("--out", default=None,
                       help="directory for results.json, results.csv and accuracy.png "
                            "(default: keras-ewc-out/<command>)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--tf-logs", action="store_true", default=argparse.SUPPRESS,
                       help="show TensorFlow's own start-up and C++ logs")

    demo = sub.add_parser(
        "demo", formatter_class=_HelpFormatter,
        help="fine-tuning vs EWC on permuted Fashion-MNIST (bundled, offline)",
        description="Plain fine-tuning against EWC on a permuted sequence of the bundled "
                    "Fashion-MNIST subset (Domain-IL, exact Fisher). Offline; "
                    f"{DEMO_DURATION} on 2 CPU cores.")
    common(demo, tasks=5, steps=400, hidden="400,400", fisher=300)
    demo.add_argument("--strength", type=float, default=DEMO_STRENGTH,
                      help="EWC strength λ")

    run = sub.add_parser(
        "run", formatter_class=_HelpFormatter,
        help="sweep the EWC strength on a task sequence and report the best",
        description="Trains fine-tuning and EWC at each strength on one task sequence, "
                    "prints a table and reports the strength with the best average "
                    "accuracy when it beats the others by more than --tie; when that "
                    "strength is at an end of the grid, suggests the next strengths "
                    "to try.")
    common(run, tasks=5, steps=500, hidden="400,400", fisher=1000)
    run.add_argument("--scenario", default=None,
                     help="task, domain or class (default: task for split, else domain)")
    run.add_argument("--sequence", default="permuted", help="permuted, split or rotated")
    run.add_argument("--dataset", default="bundled",
                     help="'bundled' (the Fashion-MNIST subset in the package), a TFDS "
                          "name such as mnist, or a directory of MNIST-format IDX files")
    run.add_argument("--estimator", default="exact",
                     help="Fisher estimator: exact, sampled, empirical or batched")
    run.add_argument("--strength", default="1e2,1e3,1e4",
                     help="comma-separated EWC strengths to sweep")
    run.add_argument("--no-baseline", action="store_true", help="skip plain fine-tuning")
    run.add_argument("--tie", type=float, default=None,
                     help="differences in average accuracy up to this count as ties: no "
                          "strength is called best, no wider grid suggested (default: two "
                          "standard errors of the test sampling: 0.01 to 0.03 on the bundled "
                          "data)")
    return parser


def _model(sequence, hidden, lr, seed, strength=None):
    import keras

    from keras_ewc.continual import mlp

    net = mlp(sequence.input_shape, sequence.num_outputs, hidden=hidden,
              task_il=sequence.scenario == "task", seed=seed)
    model = net if strength is None else _ewc_class()(net, strength=strength)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _run_methods(args, sequence, methods, estimator, out_dir, title):
    import keras

    from keras_ewc.continual import (
        plot_results,
        results_table,
        save_results,
        train_sequence,
    )

    hidden = _ints(args.hidden, "--hidden")
    results = []
    for label, strength in methods:
        keras.utils.set_random_seed(args.seed)
        model = _model(sequence, hidden, args.lr, args.seed, strength)
        res = train_sequence(
            model, sequence, epochs=args.epochs or 1,
            steps_per_task=None if args.epochs else args.steps,
            batch_size=args.batch_size, estimator=estimator,
            fisher_examples=args.fisher_examples, verbose=0 if args.quiet else 1,
            seed=args.seed, label=label,
        )
        res.config.update({"hidden": hidden, "lr": args.lr, "seed": args.seed})
        if strength is None:
            res.config["method"] = "finetune"
        else:
            res.config.update({"method": "ewc", "strength": strength,
                               "estimator": estimator})
        results.append(res)
        print(f"{label}: average accuracy {res.average_accuracy:.3f} "
              f"({res.config['seconds']:.0f} s)", flush=True)
    print()
    print(title)
    print(results_table(results, footnote=True))
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    csv_path = os.path.join(out_dir, "results.csv")
    save_results(results, json_path=json_path, csv_path=csv_path)
    written = [json_path, csv_path]
    try:
        written.append(plot_results(results, os.path.join(out_dir, "accuracy.png"),
                                    title=title))
    except ImportError as e:
        print(f"(no plot: {e})")
    return results, written


def _demo(args) -> int:
    from keras_ewc.continual import load_bundled, permuted_sequence

    start = time.perf_counter()
    sequence = permuted_sequence(load_bundled(), num_tasks=args.tasks, scenario="domain",
                                 seed=args.seed)
    print(f"keras-ewc demo: {len(sequence)} permuted Fashion-MNIST tasks (bundled subset, "
          f"{len(sequence[0].y_train)} training images a task), Domain-IL, "
          f"MLP {args.hidden}; "
          + training_text(args.epochs, args.steps, args.batch_size,
                          len(sequence[0].y_train)) + ".")
    print("Plain fine-tuning first, then EWC (exact Fisher, strength "
          f"{args.strength:g}).", flush=True)
    methods = [("fine-tuning", None), (f"EWC (λ={args.strength:g})", args.strength)]
    title = sequence.title
    results, written = _run_methods(args, sequence, methods, "exact",
                                    args.out or os.path.join("keras-ewc-out", "demo"), title)
    finetune, ewc = results
    gain = ewc.average_accuracy - finetune.average_accuracy
    print()
    print(f"EWC average accuracy {ewc.average_accuracy:.3f} vs fine-tuning "
          f"{finetune.average_accuracy:.3f}: {100 * gain:+.1f} points; forgetting "
          f"{ewc.forgetting:.3f} vs {finetune.forgetting:.3f}.")
    note = little_gain_note(sequence.scenario, gain)
    if note:
        print(note)
    print("Wrote " + ", ".join(written))
    print(f"Total time {time.perf_counter() - start:.0f} s.")
    return 0


def training_text(epochs: int | None, steps: int, batch_size: int, examples: int) -> str:
    """What training each task gets, in batches and in passes over its examples.

    Example:

    >>> from keras_ewc.cli import training_text
    >>> training_text(None, 400, 128, 6000)
    'each task trained for 400 batches of 128 (8.5 passes over its 6,000 images)'
    >>> training_text(2, 400, 128, 6000)
    'each task trained for 2 passes over its 6,000 images (batches of 128)'
    """
    if epochs:
        passes = "1 pass" if epochs == 1 else f"{epochs} passes"
        return (f"each task trained for {passes} over its {examples:,} images "
                f"(batches of {batch_size})")
    passes = steps * batch_size / examples
    shown = f"{passes:.1f}" if passes >= 0.1 else f"{passes:.2g}"
    return (f"each task trained for {steps} batches of {batch_size} "
            f"({shown} passes over its {examples:,} images)")


def check_arguments(args) -> None:
    """Checks the parsed arguments that need no data and no TensorFlow, so that a mistake
    is answered at once (the dataset and the scenario are checked when they are used)."""
    _positive(args.tasks, "tasks")
    _positive(args.steps, "steps")
    _positive(args.epochs, "epochs")
    _positive(args.batch_size, "batch-size")
    _positive(args.fisher_examples, "fisher-examples")
    _ints(args.hidden, "--hidden")
    if not args.lr > 0:
        raise ValueError(f"Expected --lr > 0. Received: {args.lr}")
    if args.command != "run":
        return
    if args.sequence not in SEQUENCES:
        raise ValueError(
            f"Unknown sequence. Expected one of {list(SEQUENCES)}. "
            f"Received: --sequence {args.sequence}"
        )
    if args.estimator not in ESTIMATORS:
        raise ValueError(
            f"Unknown estimator. Expected one of {list(ESTIMATORS)}. "
            f"Received: --estimator {args.estimator}"
        )
    _floats(args.strength, "--strength")
    if args.tie is not None and not args.tie >= 0:
        raise ValueError(f"Expected --tie >= 0. Received: {args.tie}")


def _run(args) -> int:
    from keras_ewc.continual import load_dataset, make_sequence
    from keras_ewc.continual.tasks import display_name, normalize_scenario

    scenario = None if args.scenario is None else normalize_scenario(args.scenario)
    strengths = _floats(args.strength, "--strength")
    data = load_dataset(args.dataset)
    sequence = make_sequence(args.sequence, data, args.tasks, scenario, seed=args.seed)
    print(f"keras-ewc run: {sequence.kind} {display_name(data.name)}, {len(sequence)} tasks, "
          f"{sequence.scenario.capitalize()}-IL, {sequence.num_outputs} outputs; "
          f"estimator {args.estimator}; strengths {', '.join(f'{s:g}' for s in strengths)}.",
          flush=True)
    methods = [] if args.no_baseline else [("fine-tuning", None)]
    methods += [(f"EWC (λ={s:g})", s) for s in strengths]
    title = f"{sequence.title}, {args.estimator} Fisher"
    results, written = _run_methods(args, sequence, methods, args.estimator,
                                    args.out or os.path.join("keras-ewc-out", "run"), title)
    ewc = [r for r in results if r.config.get("method") == "ewc"]
    accuracies = {r.config["strength"]: r.average_accuracy for r in ewc}
    best_accuracy = max(accuracies.values())
    num_test = sum(len(task.y_test) for task in sequence)
    tie = args.tie if args.tie is not None else sampling_margin(best_accuracy, num_test)
    best, tied = choose_strength(accuracies, tie)
    print()
    if best is not None:
        chosen = next(r for r in ewc if r.config["strength"] == best)
        margin = (f"; the others are more than {tie:.3f} below" if len(accuracies) > 1
                  else "")
        print(f"Best strength: {best:g} (average accuracy {chosen.average_accuracy:.3f}, "
              f"forgetting {chosen.forgetting:.3f}{margin}).")
        edge = grid_edge_note(strengths, best)
        if edge:
            print(edge)
    elif len(tied) > 1:
        print(f"No strength is clearly best: {', '.join(f'{s:g}' for s in tied)} are within "
              f"{tie:.3f} of the top average accuracy {best_accuracy:.3f}"
              + ("" if args.tie is not None else
                 f" (two standard errors of an accuracy measured on {num_test:,} test "
                 "examples; one seed cannot measure the training noise: compare other "
                 "--seed values, or set --tie)")
              + ".")
    if not args.no_baseline:
        note = little_gain_note(sequence.scenario,
                                best_accuracy - results[0].average_accuracy)
        if note:
            print(note)
    print("Wrote " + ", ".join(written))
    return 0


def _strength_text(value: float) -> str:
    # 1e6 rather than 1e+06 or 1000000, as the user would type it.
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def sampling_margin(accuracy: float, num_test: int) -> float:
    """Two standard errors of an accuracy measured on `num_test` test examples.

    The spread of the test sampling alone, `2·√(p(1 − p)/n)`: differences between two
    strengths below it are not told apart by these test sets. (Training noise, measured
    only across seeds, comes on top.)

    Example:

    >>> from keras_ewc.cli import sampling_margin
    >>> round(sampling_margin(0.5, 10_000), 4)
    0.01
    """
    p = min(max(float(accuracy), 0.0), 1.0)
    return 2.0 * (p * (1.0 - p) / max(int(num_test), 1)) ** 0.5


def choose_strength(accuracies: dict, tie: float) -> tuple:
    """Picks the best strength only when it beats every other one by more than `tie`.

    Args:
        accuracies: `{strength: average accuracy}`.
        tie: differences of at most this much count as ties (a measured spread: across
            seeds, or of the test sampling, see `sampling_margin`).

    Returns:
        `(best, tied)`: `best` the strength whose average accuracy exceeds every other
        one's by more than `tie`, or None; `tied` the strengths within `tie` of the top
        (with `best` alone when there is one), in the grid's order.

    Example:

    >>> from keras_ewc.cli import choose_strength
    >>> choose_strength({100.0: 0.196, 1000.0: 0.197, 1e4: 0.190}, tie=0.01)
    (None, [100.0, 1000.0, 10000.0])
    >>> choose_strength({100.0: 0.60, 1000.0: 0.72, 1e4: 0.65}, tie=0.01)
    (1000.0, [1000.0])
    """
    if tie < 0:
        raise ValueError(f"Expected tie >= 0. Received: tie={tie}")
    top = max(accuracies.values())
    tied = [s for s in sorted(accuracies) if top - accuracies[s] <= tie]
    return (tied[0], tied) if len(tied) == 1 else (None, tied)


def grid_edge_note(strengths: list[float], best: float) -> str | None:
    """Says when the best strength is at an end of its grid, and which strengths to try next.

    The next values continue the grid's own step (its largest ratio between neighbours,
    10 for a single value): the best, then two steps beyond it.

    Args:
        strengths: the strengths swept.
        best: the one with the best average accuracy.

    Returns:
        A sentence, or None when the best lies strictly inside the grid.

    Example:

    >>> from keras_ewc.cli import grid_edge_note
    >>> print(grid_edge_note([1e2, 1e3, 1e4], 1e4))
    The best strength is the largest of the grid: a larger one may be better.
    Try --strength 1e4,1e5,1e6.
    >>> grid_edge_note([1e2, 1e3, 1e4], 1e3) is None
    True
    """
    grid = sorted(set(strengths))
    if len(grid) > 1 and grid[0] < best < grid[-1]:
        return None
    positive = [s for s in grid if s > 0]
    ratios = [b / a for a, b in zip(positive, positive[1:])]
    step = max(ratios) if ratios else 10.0
    if best == 0:
        return ("The best strength is 0: EWC did not help on this sequence at these "
                "settings.")
    if len(grid) == 1:
        values, where = [best / step, best, best * step], "Only one strength was tried"
    elif best == grid[-1]:
        values = [best, best * step, best * step * step]
        where = "The best strength is the largest of the grid: a larger one may be better"
    else:
        values = [best / step / step, best / step, best]
        where = "The best strength is the smallest of the grid: a smaller one may be better"
    return f"{where}. Try --strength " + ",".join(_strength_text(v) for v in values) + "."


def little_gain_note(scenario: str, gain: float) -> str | None:
    """Explains a small gain of EWC over fine-tuning in Domain-IL and Class-IL.

    Args:
        scenario: `"task"`, `"domain"` or `"class"`.
        gain: best EWC average accuracy minus fine-tuning's.

    Returns:
        A sentence, or None when EWC gained at least 3 points or the scenario is Task-IL.

    Example:

    >>> from keras_ewc.cli import little_gain_note
    >>> little_gain_note("class", 0.005).startswith("EWC gained +0.5 points: expected")
    True
    >>> little_gain_note("task", 0.005) is None
    True
    """
    if scenario == "task" or gain >= LITTLE_GAIN:
        return None
    why = {
        "class": "in Class-IL a parameter penalty cannot stop the new classes' outputs from "
                 "taking over; regularisation methods such as EWC stay near fine-tuning",
        "domain": "in Domain-IL the tasks share one output layer and EWC is known to help "
                  "only partly, least when the tasks overlap (as in split sequences)",
    }[scenario]
    return (f"EWC gained {100 * gain:+.1f} points: expected, {why} (van de Ven, Tuytelaars "
            "& Tolias, 'Three types of incremental learning', Nature Machine Intelligence "
            "2022). Replay methods are what help there.")


def main(argv: list[str] | None = None) -> int:
    """Runs the `keras-ewc` command and returns its exit code.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Example:

    >>> from keras_ewc.cli import main
    >>> main(["demo", "--tasks", "2", "--steps", "50", "--out", "demo-out"])  # doctest: +SKIP
    0
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the problem
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        check_arguments(args)
    except ValueError as e:
        print(f"keras-ewc: error: {e}", file=sys.stderr)
        return 2
    from keras_ewc import _startup

    if not args.tf_logs:
        _startup.import_tensorflow_quietly()  # a no-op when keras_ewc's import did it
    import tensorflow as tf

    if not args.tf_logs:
        tf.get_logger().setLevel("ERROR")  # retracing notices are not the user's concern
    try:
        return _demo(args) if args.command == "demo" else _run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"keras-ewc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
