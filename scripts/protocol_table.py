"""Tables of the runs of `scripts/results_protocol.py`, from one or several `runs.json`.

The protocol script writes the table of its own runs; this one merges runs made by several
invocations (rows split over processes with `--methods`) into one table:

    python scripts/protocol_table.py results/permuted_a results/permuted_b --detail

For every row the best strength is the one with the best mean average accuracy over the
seeds; only strengths run with every seed of that row take part. `--detail` adds every
(row, strength) with its per-seed values. Plain Python: no TensorFlow needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ORDER = ("none", "exact", "sampled", "empirical", "batched", "online", "kronecker",
         "kronecker-online", "joint")
NAMES = {"none": "None (fine-tuning)", "joint": "Joint (upper bound)",
         "online": "Online EWC (exact, γ = 1)",
         "kronecker": "Kronecker EWC (exact, separate)",
         "kronecker-online": "Kronecker EWC (exact, online, γ = 1)"}
# Settings that must agree for runs to share a table.
SETTINGS = ("protocol", "tasks", "iterations", "batch_size", "lr", "fisher_examples")


def mean_se(values):
    """Mean and standard error (NaN for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def strength_text(strength):
    """`1e+06` as `1e6`; `None` (rows without a strength) as a dash."""
    if strength is None:
        return "–"
    return f"{strength:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def name(method):
    return NAMES.get(method, f"EWC ({method})")


def _grouped(runs, method):
    by_strength = {}
    for r in runs:
        if r["method"] == method:
            by_strength.setdefault(r["strength"], {})[r["seed"]] = r["average_accuracy"]
    return by_strength


def best_strengths(runs):
    """{method: (best strength, {seed: accuracy})}, over strengths run with every seed."""
    result = {}
    for method in sorted({r["method"] for r in runs}, key=_order):
        by_strength = _grouped(runs, method)
        seeds = set().union(*(set(s) for s in by_strength.values()))
        complete = {s: accs for s, accs in by_strength.items() if set(accs) == seeds}
        if not complete:
            continue
        best = max(complete, key=lambda s: sum(complete[s].values()) / len(complete[s]))
        result[method] = (best, complete[best])
    return result


def _order(method):
    return ORDER.index(method) if method in ORDER else len(ORDER)


def _grid(by_strength):
    return ", ".join(strength_text(s) for s in sorted(by_strength))


def _accuracy_cells(accs):
    """`mean ± s.e. | per seed` (%) of {seed: accuracy}."""
    m, se = mean_se(accs.values())
    per_seed = ", ".join(f"{100 * accs[s]:.2f}" for s in sorted(accs))
    return f"{100 * m:.2f} ± {100 * se:.2f} | {per_seed}"


def make_table(runs, detail=False) -> str:
    """A Markdown table: best strength, mean ± s.e. (%), and per-seed values, per row."""
    lines = ["| method | best strength (of the grid) | avg acc % (mean ± s.e.) | per seed |",
             "|---|---|---|---|"]
    for method, (best, accs) in best_strengths(runs).items():
        grid = _grouped(runs, method)
        strength = "–" if best is None else f"{strength_text(best)} (of {_grid(grid)})"
        lines.append(f"| {name(method)} | {strength} | {_accuracy_cells(accs)} |")
    if detail:
        lines += ["", "| method | strength | avg acc % (mean ± s.e.) | per seed |",
                  "|---|---|---|---|"]
        for method in sorted({r["method"] for r in runs}, key=_order):
            for strength, accs in sorted(_grouped(runs, method).items(),
                                         key=lambda kv: kv[0] or 0.0):
                lines.append(f"| {name(method)} | {strength_text(strength)} | "
                             f"{_accuracy_cells(accs)} |")
    return "\n".join(lines)


def load_runs(paths):
    """The runs of several `runs.json` files (or directories holding one), checked to share
    the protocol's settings and not to repeat a (method, strength, seed)."""
    runs, settings, seen = [], None, set()
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, "runs.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No runs file at {path!r}: expected the `runs.json` "
                                    "written by scripts/results_protocol.py.")
        with open(path) as f:
            content = json.load(f)
        these = {k: content["args"].get(k) for k in SETTINGS}
        if settings is None:
            settings = these
        elif these != settings:
            raise ValueError(f"{path} was run with other settings: {these}, expected "
                             f"{settings} as in the first file.")
        for r in content["runs"]:
            key = (r["method"], r["strength"], r["seed"])
            if key in seen:
                raise ValueError(f"The run {key} (method, strength, seed) is in more than "
                                 f"one file; the last one is {path}.")
            seen.add(key)
            runs.append(r)
    return runs, settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="runs.json files or directories with one")
    parser.add_argument("--detail", action="store_true", help="also every strength")
    args = parser.parse_args(argv)
    runs, settings = load_runs(args.runs)
    print(", ".join(f"{k} {v}" for k, v in settings.items()) + f"; {len(runs)} runs, "
          f"{sum(r['seconds'] for r in runs) / 60:.0f} min")
    print(make_table(runs, detail=args.detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
