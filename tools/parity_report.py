"""Summarize dfp16 vs float32 training runs and plot their training curves.

Reads the summary.json that `python -m model_garden.train` writes into each run
directory under RUNS_DIR (for example runs/parity from benchmarks/parity_simplenet.sh),
prints a Markdown report, and writes PNG plots of the training loss and accuracy against
the step:

    python tools/parity_report.py runs/parity --plot=docs/images/simplenet_parity.png

The report has one row per run, then the mean and sample standard deviation of the
test accuracy over seeds for each policy. Last comes the paired difference dfp16 -
float32 of the runs that share a seed, which share initial weights, data order and
dropout masks.
"""

import glob
import json
import math
import os
import statistics
import sys

from absl import app
from absl import flags
from absl import logging

_PLOT = flags.DEFINE_string(
    "plot", "", "Write the training curves to this PNG file (empty: no plot)."
)
REQUIRED_KEYS = (
    "model", "policy", "seed", "batch_size", "steps_per_epoch", "seconds_per_epoch",
    "test_accuracy", "test_loss",
)

_POLICIES = flags.DEFINE_list(
    "policies", "float32,dfp16", "Policies to compare; the first is the baseline."
)


def load_runs(runs_dir):
    """Return the summary dicts of the run directories in `runs_dir`, sorted by policy, seed.

    Raises:
      ValueError: if no run directory has a summary.json.
    """
    paths = sorted(glob.glob(os.path.join(runs_dir, "*", "summary.json")))
    if not paths:
        raise ValueError(
            f"Expected run directories with a summary.json. Received: runs_dir={runs_dir!r}, "
            "which has none. Pass the OUT_DIR of benchmarks/parity_simplenet.sh, "
            "for example runs/parity."
        )
    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as summary_file:
                summary = json.load(summary_file)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Expected a readable summary.json. Received: {path!r}, which failed to "
                f"read ({error}). Delete that run directory or run it again."
            ) from error
        missing = [key for key in REQUIRED_KEYS if key not in summary]
        if missing:
            raise ValueError(
                f"Expected a summary.json of a finished run. Received: {path!r}, which "
                f"has no {', '.join(missing)}. Delete that run directory or run it again."
            )
        summary["run_dir"] = os.path.dirname(path)
        runs.append(summary)
    settings = {(run["model"], run["batch_size"], run["steps_per_epoch"]) for run in runs}
    if len(settings) > 1:
        logging.warning(
            "The runs in %s differ in (model, batch_size, steps_per_epoch): %s; the "
            "report averages them together.", runs_dir, sorted(settings),
        )
    return sorted(runs, key=lambda run: (run["policy"], run["seed"]))


def steady_seconds_per_epoch(run):
    """Return the mean seconds per epoch without the first epoch, which includes tracing.

    A single-epoch run returns its only epoch.
    """
    seconds = run["seconds_per_epoch"]
    steady = seconds[1:] or seconds
    return sum(steady) / len(steady)


def images_per_second(run):
    """Return the training images per second of the epochs after the first."""
    images_per_epoch = run["steps_per_epoch"] * run["batch_size"]
    return images_per_epoch / steady_seconds_per_epoch(run)


def _mean_std(values):
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.mean(values), statistics.stdev(values)


def _percent(mean, std):
    if math.isnan(std):
        return f"{100 * mean:.2f} %"
    return f"{100 * mean:.2f} ± {100 * std:.2f} %"


def report(runs, policies):
    """Return the Markdown report of `runs` for `policies` (baseline first)."""
    lines = [
        "| policy | seed | test accuracy | test loss | s/epoch (first) | s/epoch (rest) "
        "| train images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['policy']} | {run['seed']} | {100 * run['test_accuracy']:.2f} % "
            f"| {run['test_loss']:.4f} | {run['seconds_per_epoch'][0]:.0f} "
            f"| {steady_seconds_per_epoch(run):.0f} | {images_per_second(run):.1f} |"
        )
    lines += ["", "| policy | runs | test accuracy, mean ± std | train images/s, mean |",
              "|---|---|---|---|"]
    by_policy = {}
    for policy in policies:
        policy_runs = [run for run in runs if run["policy"] == policy]
        by_policy[policy] = {run["seed"]: run for run in policy_runs}
        mean, std = _mean_std([run["test_accuracy"] for run in policy_runs])
        speeds = [images_per_second(run) for run in policy_runs]
        speed = f"{statistics.mean(speeds):.1f}" if speeds else "-"
        lines.append(f"| {policy} | {len(policy_runs)} | {_percent(mean, std)} | {speed} |")

    baseline = policies[0]
    for policy in policies[1:]:
        seeds = sorted(set(by_policy[baseline]) & set(by_policy[policy]))
        differences = [
            by_policy[policy][seed]["test_accuracy"]
            - by_policy[baseline][seed]["test_accuracy"]
            for seed in seeds
        ]
        mean, std = _mean_std(differences)
        if seeds:
            lines += [
                "",
                f"Paired difference {policy} - {baseline} over seeds {seeds}: "
                f"{100 * mean:+.2f} percentage points"
                + ("" if math.isnan(std) else f" (std {100 * std:.2f})")
                + ".",
            ]
    return "\n".join(lines)


def plot(runs, policies, path):
    """Write training loss and accuracy against the step, one line per run, to `path`."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(11, 4))
    colors = {policy: f"C{index}" for index, policy in enumerate(policies)}
    for run in runs:
        if run["policy"] not in colors or not run.get("train_curve"):
            continue
        steps, losses, accuracies = zip(*run["train_curve"])
        label = f"{run['policy']} seed {run['seed']}"
        style = {
            "color": colors[run["policy"]],
            "linestyle": ("-", "--", ":", "-.")[run["seed"] % 4],
            "alpha": 0.8,
            "linewidth": 1.2,
        }
        loss_axes.plot(steps, losses, label=label, **style)
        accuracy_axes.plot(steps, [100 * value for value in accuracies], label=label, **style)
    model = runs[0]["model"]
    loss_axes.set(xlabel="step", ylabel="training loss (running mean in epoch)",
                  title=f"{model}: training loss")
    accuracy_axes.set(xlabel="step", ylabel="training accuracy, % (running mean in epoch)",
                      title=f"{model}: training accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    logging.info("Wrote %s.", path)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(
            f"Expected one argument, the runs directory. Received: {argv[1:]}. "
            "Usage: python tools/parity_report.py RUNS_DIR [--plot=FILE.png]"
        )
    try:
        runs = load_runs(argv[1])
    except ValueError as error:
        logging.error("%s", error)
        sys.exit(2)
    print(report(runs, _POLICIES.value))
    if _PLOT.value:
        plot(runs, _POLICIES.value, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
