"""Time DFP16 conv layers per kernel path next to TensorFlow float32 and bfloat16.

For each 3x3 stride-1 SAME convolution shape (the distinct 3x3 convolutions
of ResNet-50 and SimpleNet-style 32x32 CIFAR layers) the script times the
forward, backprop-input and backprop-filter ops of keras-dfp on every kernel
path this CPU supports, the quantization of their operands, and
tf.nn.conv2d with its two gradients in float32 and bfloat16, all in the same
process. Ratios are TF float32 time / keras-dfp time, so above 1 is faster.

    python benchmarks/conv_layers.py --quick
    python benchmarks/conv_layers.py --batch 32 --json out.json --markdown out.md

Times are medians of --repeats runs after one warm-up run, in milliseconds.
No test asserts on these numbers.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_dfp import ops  # noqa: E402

# (group, height, width, in_channels, out_channels)
RESNET50_SHAPES = (
    ("resnet50", 56, 56, 64, 64),
    ("resnet50", 28, 28, 128, 128),
    ("resnet50", 14, 14, 256, 256),
    ("resnet50", 7, 7, 512, 512),
)
SIMPLENET_SHAPES = (
    ("simplenet", 32, 32, 3, 64),
    ("simplenet", 32, 32, 64, 128),
    ("simplenet", 16, 16, 128, 256),
    ("simplenet", 8, 8, 256, 256),
)
DIRECTIONS = ("forward", "backprop_input", "backprop_filter")


def _median_ms(fn, repeats):
    fn()  # Warm-up: kernel selection, allocations, oneDNN primitive caches.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _isa_flags():
    reported_flags = (
        "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "amx_tile", "amx_int8", "amx_bf16",
    )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in reported_flags if flag in present]
    except OSError:
        pass
    return []


def _time_tf(shape, batch, dtype, repeats):
    _, height, width, in_c, out_c = shape
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, height, width, in_c)), dtype)
    w = tf.constant(rng.standard_normal((3, 3, in_c, out_c)), dtype)
    dy = tf.constant(rng.standard_normal((batch, height, width, out_c)), dtype)
    input_sizes = tf.constant(x.shape, tf.int32)
    filter_sizes = tf.constant(w.shape, tf.int32)
    strides = [1, 1, 1, 1]
    calls = {
        "forward": lambda: tf.nn.conv2d(x, w, strides, "SAME"),
        "backprop_input": lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=input_sizes, filter=w, out_backprop=dy,
            strides=strides, padding="SAME"),
        "backprop_filter": lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=filter_sizes, out_backprop=dy,
            strides=strides, padding="SAME"),
    }
    results = {}
    for direction, call in calls.items():
        try:
            results[direction] = _median_ms(call, repeats)
        except (tf.errors.OpError, TypeError) as error:
            results[direction] = None
            print(f"  {dtype.name} {direction} unavailable: {error}".splitlines()[0])
    return results


def _time_dfp(shape, batch, repeats):
    _, height, width, in_c, out_c = shape
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, height, width, in_c)), tf.float32)
    w = tf.constant(rng.standard_normal((3, 3, in_c, out_c)), tf.float32)
    dy = tf.constant(rng.standard_normal((batch, height, width, out_c)), tf.float32)
    x_m, x_e = ops.quantize(x)
    w_m, w_e = ops.quantize(w)
    dy_m, dy_e = ops.quantize(dy)
    input_sizes = tf.constant(x.shape, tf.int32)
    filter_sizes = tf.constant(w.shape, tf.int32)
    calls = {
        "forward": lambda: ops.conv2d_int(x_m, x_e, w_m, w_e, 1, "SAME"),
        "backprop_input": lambda: ops.conv2d_backprop_input_int(
            input_sizes, w_m, w_e, dy_m, dy_e, 1, "SAME"),
        "backprop_filter": lambda: ops.conv2d_backprop_filter_int(
            x_m, x_e, filter_sizes, dy_m, dy_e, 1, "SAME"),
    }
    results = {direction: _median_ms(call, repeats) for direction, call in calls.items()}
    # Quantization a training step adds: x and w before the forward op, dy
    # before both backprop ops.
    results["quantize_forward"] = _median_ms(
        lambda: (ops.quantize(x), ops.quantize(w)), repeats)
    results["quantize_backward"] = _median_ms(lambda: ops.quantize(dy), repeats)
    return results


def _geometric_mean(values):
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _format(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def run(args):
    shapes = RESNET50_SHAPES + SIMPLENET_SHAPES
    paths = list(ops.supported_kernel_paths())
    if args.paths:
        requested = args.paths.split(",")
        paths = [p for p in paths if p in requested]
    info = {
        "cpu_model": _cpu_model(),
        "isa_flags": _isa_flags(),
        "tensorflow_version": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "repeats": args.repeats,
        "supported_kernel_paths": list(ops.supported_kernel_paths()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"CPU: {info['cpu_model']}")
    print(f"ISA flags: {' '.join(info['isa_flags'])}")
    print(f"TensorFlow {info['tensorflow_version']}, batch {args.batch}, "
          f"median of {args.repeats}")
    print(f"Kernel paths timed: {', '.join(paths)} "
          f"(default auto path: {ops.get_kernel_path()})")

    rows = []
    for shape in shapes:
        group, height, width, in_c, out_c = shape
        row = {"group": group, "height": height, "width": width,
               "in_channels": in_c, "out_channels": out_c}
        row["tf_float32"] = _time_tf(shape, args.batch, tf.float32, args.repeats)
        row["tf_bfloat16"] = _time_tf(shape, args.batch, tf.bfloat16, args.repeats)
        row["dfp16"] = {}
        for path in paths:
            ops.set_kernel_path(path)
            row["dfp16"][path] = _time_dfp(shape, args.batch, args.repeats)
        ops.set_kernel_path("auto")
        rows.append(row)
        print(f"{group} {height}x{width}x{in_c}->{out_c}: " + ", ".join(
            f"{path} fwd {row['dfp16'][path]['forward']:.1f} ms"
            for path in paths) + f", tf fp32 fwd {row['tf_float32']['forward']:.1f} ms")

    summary = {}
    for path in paths:
        ratios = [row["tf_float32"][d] / row["dfp16"][path][d]
                  for row in rows for d in DIRECTIONS]
        ratios_with_quantize = []
        for row in rows:
            times = row["dfp16"][path]
            ratios_with_quantize.append(
                sum(row["tf_float32"][d] for d in DIRECTIONS)
                / (sum(times[d] for d in DIRECTIONS)
                   + times["quantize_forward"] + times["quantize_backward"]))
        summary[path] = {
            "geomean_speed_vs_tf_float32": _geometric_mean(ratios),
            "geomean_step_speed_vs_tf_float32_with_quantize":
                _geometric_mean(ratios_with_quantize),
        }
    bf16_ratios = [row["tf_float32"][d] / row["tf_bfloat16"][d]
                   for row in rows for d in DIRECTIONS
                   if row["tf_bfloat16"][d] is not None]
    summary["tf_bfloat16"] = {"geomean_speed_vs_tf_float32": _geometric_mean(bf16_ratios)}

    markdown = _markdown(info, rows, paths, summary)
    print()
    print(markdown)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as output:
            json.dump({"info": info, "rows": rows, "summary": summary}, output, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as output:
            output.write(markdown)


def _markdown(info, rows, paths, summary):
    lines = [
        f"CPU: {info['cpu_model']}; ISA: {' '.join(info['isa_flags'])}; "
        f"TensorFlow {info['tensorflow_version']}; batch {info['batch']}; "
        f"median of {info['repeats']} runs; times in ms; ratio = TF float32 time / "
        "time (above 1 is faster than TF float32).",
        "",
        "| layer (HxWxC->O) | direction | TF fp32 | TF bf16 (ratio) | "
        + " | ".join(f"{p} (ratio)" for p in paths) + " |",
        "|---|---|---|---|" + "---|" * len(paths),
    ]
    for row in rows:
        name = (f"{row['group']} {row['height']}x{row['width']}x"
                f"{row['in_channels']}->{row['out_channels']}")
        for direction in DIRECTIONS:
            fp32 = row["tf_float32"][direction]
            bf16 = row["tf_bfloat16"][direction]
            cells = [name, direction, _format(fp32),
                     f"{_format(bf16)} ({_format(fp32 / bf16 if bf16 else None)})"]
            for path in paths:
                t = row["dfp16"][path][direction]
                cells.append(f"{_format(t)} ({fp32 / t:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        quantize_cells = [name, "quantize x,w / dy", "-", "-"]
        for path in paths:
            times = row["dfp16"][path]
            quantize_cells.append(
                f"{_format(times['quantize_forward'])} / {_format(times['quantize_backward'])}")
        lines.append("| " + " | ".join(quantize_cells) + " |")
    lines.append("")
    lines.append("Geometric mean of the speed ratio vs TF float32 over all layers and "
                 "directions (quantization excluded; 'with quantize' compares a full "
                 "forward + backward step of each layer including quantization):")
    lines.append("")
    for path in paths:
        s = summary[path]
        lines.append(
            f"- {path}: {_format(s['geomean_speed_vs_tf_float32'])} "
            f"(with quantize: "
            f"{_format(s['geomean_step_speed_vs_tf_float32_with_quantize'])})")
    lines.append(f"- TF bfloat16: "
                 f"{_format(summary['tf_bfloat16']['geomean_speed_vs_tf_float32'])}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32,
                        help="batch size of every layer (default 32)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per measurement; the median is reported")
    parser.add_argument("--quick", action="store_true",
                        help="batch 4 and 3 repeats, for a run of a few minutes")
    parser.add_argument("--paths", default="",
                        help="comma-separated kernel paths to time (default: all supported)")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    parser.add_argument("--markdown", default="",
                        help="write the markdown table to this file")
    args = parser.parse_args()
    if args.quick:
        args.batch = 4
        args.repeats = 3
    if args.batch < 1 or args.repeats < 1:
        parser.error(f"Expected --batch and --repeats >= 1. Received: "
                     f"batch={args.batch}, repeats={args.repeats}")
    run(args)


if __name__ == "__main__":
    main()
