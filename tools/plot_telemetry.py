"""Plot the DFP16 telemetry of a training run as PNG files.

Reads the TensorBoard event files that `keras_dfp.telemetry.TensorBoardCallback`
wrote (tags "dfp16/<op>/<kind>/<statistic>") and writes three figures, each
with one panel per tensor kind (activation, weight, gradient) and one line
per DFP16 op:

- exponents.png: the shared exponent over the train steps;
- saturation.png: the saturated fraction over the train steps;
- underflow.png: the underflow fraction over the train steps.

Usage:

    python tools/plot_telemetry.py LOG_DIR [--output_dir DIR]
"""

import argparse
import collections
import glob
import logging
import os
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402

_logger = logging.getLogger(__name__)

KINDS = ("activation", "weight", "gradient")
FIGURES = {
    "exponent": ("exponents.png", "shared exponent e"),
    "saturated_fraction": ("saturation.png", "saturated fraction"),
    "underflow_fraction": ("underflow.png", "underflow fraction"),
}
_TAG_PREFIX = "dfp16/"


def read_scalars(log_dir):
    """Return {statistic: {kind: {op name: [(step, value), ...]}}} from `log_dir`.

    Raises:
      FileNotFoundError: if `log_dir` has no event file.
    """
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
    if not paths:
        raise FileNotFoundError(
            f"Expected TensorBoard event files (events.out.tfevents.*) in {log_dir!r}. "
            f"Received: log_dir={log_dir!r} without any. Pass the log_dir of "
            "keras_dfp.telemetry.TensorBoardCallback."
        )
    series = collections.defaultdict(
        lambda: collections.defaultdict(lambda: collections.defaultdict(list))
    )
    for path in paths:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if not value.tag.startswith(_TAG_PREFIX):
                    continue
                # Op names may contain "/" (for example "sep/depthwise"), so
                # kind and statistic are taken from the end of the tag.
                op_name, kind, statistic = value.tag[len(_TAG_PREFIX) :].rsplit("/", 2)
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = float(value.simple_value)
                series[statistic][kind][op_name].append((event.step, number))
    return series


def plot(series, output_dir):
    """Write one PNG per statistic to `output_dir`; return the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for statistic, (file_name, label) in FIGURES.items():
        by_kind = series.get(statistic, {})
        figure, axes = plt.subplots(
            len(KINDS), 1, figsize=(9, 3 * len(KINDS)), sharex=True, squeeze=False
        )
        for axis, kind in zip(axes[:, 0], KINDS):
            for op_name, points in sorted(by_kind.get(kind, {}).items()):
                points = sorted(points)
                axis.plot(
                    [step for step, _ in points],
                    [value for _, value in points],
                    label=op_name,
                    marker="." if len(points) < 50 else None,
                )
            axis.set_title(f"{kind}: {label}")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
            if axis.lines:
                axis.legend(fontsize="small", loc="best")
        axes[-1, 0].set_xlabel("train step")
        figure.tight_layout()
        path = os.path.join(output_dir, file_name)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "log_dir", help="Directory of the TensorBoardCallback event files."
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Directory for the PNG files. Defaults to log_dir.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        series = read_scalars(args.log_dir)
    except FileNotFoundError as error:
        _logger.error("%s", error)
        return 1
    for path in plot(series, args.output_dir or args.log_dir):
        _logger.info("Wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
