"""Tests of DFP16 training under tf.distribute strategies.

Every run is a subprocess of tests/training_job.py: MirroredStrategy needs two
logical CPU devices, which must be configured before TensorFlow starts, and
MultiWorkerMirroredStrategy needs two worker processes that talk over
127.0.0.1 only.

Tolerance: each replica quantizes its own per-replica batch with its own
power-of-two exponent, so a replica's activations and output gradients can be
rounded on a finer grid than the global batch would give. The float32
gradients that are all-reduced then differ from single-device gradients by
about one DFP16 step (2**-15 of a tensor's maximum magnitude). After 16 Adam
steps at learning rate 1e-2 the measured maximum weight difference was
1.9e-5 (2 vCPU x86-64 machine); the tests allow 1e-3.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO_ROOT, "tests", "training_job.py")
# Upper bound of one run, far above the usual 10 to 30 s, because the test
# machine may be shared with other jobs.
JOB_TIMEOUT_SECONDS = 300
DFP16_WEIGHT_TOLERANCE = 1e-3
FLOAT32_WEIGHT_TOLERANCE = 1e-5


def _environment(**extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = REPO_ROOT
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _start_command(command, stdout=subprocess.PIPE, **env):
    # Each process leads its own process group, so that `_kill` ends it and
    # anything it started.
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_environment(**env),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _start(args, output, **env):
    return _start_command([sys.executable, JOB, "--output", str(output), *args], **env)


def _kill(process):
    """Send SIGKILL to the process group of `process` and wait for the process."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _wait_all(processes):
    """Wait for every process, kill the ones still running, and return their outputs."""
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=JOB_TIMEOUT_SECONDS)
            outputs.append(output)
    finally:
        for process in processes:
            _kill(process)
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs


def _free_ports(count):
    """Return `count` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tf_config(ports, index):
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )


def _max_difference(first, second):
    return max(np.abs(first[key] - second[key]).max() for key in first.files)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every configuration once, in parallel, and return their weights."""
    directory = tmp_path_factory.mktemp("distribute")
    all_ports = _free_ports(4)
    ports, float32_ports = all_ports[:2], all_ports[2:]
    common = ["--epochs", "2", "--batch_size", "4"]
    configs = {
        "single": (common, {}),
        "mirrored": (
            common
            + ["--strategy", "mirrored", "--logical_cpus", "2", "--graph_report",
               str(directory / "mirrored_graph.json")],
            {},
        ),
        "worker0": (
            common
            + ["--strategy", "multi_worker", "--graph_report",
               str(directory / "worker0_graph.json")],
            {"TF_CONFIG": _tf_config(ports, 0)},
        ),
        "worker1": (
            # Both workers trace the report step, because tracing a step over a
            # distributed dataset is a collective operation of all workers.
            common
            + ["--strategy", "multi_worker", "--graph_report",
               str(directory / "worker1_graph.json")],
            {"TF_CONFIG": _tf_config(ports, 1)},
        ),
        "single_float32": (common + ["--policy", "float32"], {}),
        "float32_worker0": (
            common + ["--policy", "float32", "--strategy", "multi_worker"],
            {"TF_CONFIG": _tf_config(float32_ports, 0)},
        ),
        "float32_worker1": (
            common + ["--policy", "float32", "--strategy", "multi_worker"],
            {"TF_CONFIG": _tf_config(float32_ports, 1)},
        ),
    }
    processes = [
        _start(args, directory / f"{name}.npz", **env) for name, (args, env) in configs.items()
    ]
    _wait_all(processes)
    weights = {name: np.load(directory / f"{name}.npz") for name in configs}
    graphs = {
        name: json.loads((directory / f"{name}_graph.json").read_text())
        for name in ("mirrored", "worker0")
    }
    return weights, graphs


def test_mirrored_matches_single_device(runs):
    weights, _ = runs
    assert int(weights["mirrored"]["iterations"]) == 16
    assert int(weights["single"]["iterations"]) == 16
    difference = _max_difference(weights["single"], weights["mirrored"])
    assert difference <= DFP16_WEIGHT_TOLERANCE, difference


def test_multi_worker_workers_agree(runs):
    weights, _ = runs
    for key in weights["worker0"].files:
        np.testing.assert_array_equal(weights["worker0"][key], weights["worker1"][key])


def test_multi_worker_matches_single_device(runs):
    weights, _ = runs
    assert int(weights["worker0"]["iterations"]) == 16
    difference = _max_difference(weights["single"], weights["worker0"])
    assert difference <= DFP16_WEIGHT_TOLERANCE, difference


def test_multi_worker_float32_fit(runs):
    weights, _ = runs
    for key in weights["float32_worker0"].files:
        np.testing.assert_array_equal(
            weights["float32_worker0"][key], weights["float32_worker1"][key]
        )
    assert int(weights["float32_worker0"]["iterations"]) == 16
    # Only the order of the float32 gradient sums differs from single-device
    # training. The measured maximum difference was 8.9e-8 (2 vCPU x86-64).
    difference = _max_difference(weights["single_float32"], weights["float32_worker0"])
    assert difference <= FLOAT32_WEIGHT_TOLERANCE, difference


@pytest.mark.parametrize("name", ["mirrored", "worker0"])
def test_all_reduce_carries_float32_only(runs, name):
    _, graphs = runs
    report = graphs[name]
    # The DFP16 ops do run in the step, so int16 mantissas exist...
    assert report["int16"] > 0, report
    # ...but only float32 gradients are all-reduced, and no int16 tensor
    # moves between devices.
    assert report["collective"], report
    assert set(report["collective"]) == {"float32"}, report
    assert "int16" not in report["cross_device"], report


def _read_until(process, marker, deadline):
    """Return the output lines of `process` up to the line `marker`."""
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.strip() == marker:
            return lines
    raise AssertionError(f"{marker} not seen before the deadline. Output: {lines[-20:]}")


def test_multi_worker_restart_resumes(runs, tmp_path):
    """SIGKILL one fit worker mid-epoch, restart the job, and compare with an uninterrupted job.

    Both workers run `Model.fit` with BackupAndRestore (one backup directory per
    worker, written after every epoch). MultiWorkerMirroredStrategy cannot
    replace one worker inside a running job: the surviving worker waits in its
    next all-reduce until the coordination service misses the dead worker's
    heartbeats and fails the step (after about 20 s on the 2 vCPU test machine).
    So, as a cluster manager would, the test then stops the surviving worker
    and restarts both, and they resume from their backups of epoch 0.
    """
    weights, _ = runs
    backup_dir = tmp_path / "backup"
    common = ["--epochs", "2", "--batch_size", "4", "--strategy", "multi_worker",
              "--backup_dir", str(backup_dir)]
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    processes = []
    try:
        ports = _free_ports(2)
        first = [
            _start(common + (["--pause_at", "1:3"] if index == 1 else []),
                   tmp_path / f"unused{index}.npz", TF_CONFIG=_tf_config(ports, index))
            for index in range(2)
        ]
        processes.extend(first)
        _read_until(first[1], "PAUSED", deadline)
        # Both workers have backed up epoch 0 before worker 1 reaches epoch 1.
        for index in range(2):
            metadata = json.loads(
                (backup_dir / f"worker{index}" / "training_metadata.json").read_text()
            )
            assert metadata["epoch"] == 1, metadata

        _kill(first[1])
        assert first[1].returncode == -signal.SIGKILL
        # Worker 0 cannot finish the step after the kill without worker 1.
        _kill(first[0])
        survivor_output = first[0].stdout.read()
        assert "BATCH 1 4" not in survivor_output, survivor_output[-3000:]
        assert "DONE" not in survivor_output, survivor_output[-3000:]

        ports = _free_ports(2)
        second = [
            _start(common, tmp_path / f"resumed{index}.npz",
                   TF_CONFIG=_tf_config(ports, index))
            for index in range(2)
        ]
        processes.extend(second)
        outputs = _wait_all(second)
    finally:
        for process in processes:
            _kill(process)

    for output in outputs:
        epochs = [line for line in output.split("\n") if line.startswith("EPOCH")]
        assert epochs == ["EPOCH 1"], epochs
    for index in range(2):
        resumed = np.load(tmp_path / f"resumed{index}.npz")
        assert int(resumed["iterations"]) == 16
        for key in resumed.files:
            np.testing.assert_array_equal(resumed[key], weights["worker0"][key])


def test_cli_mirrored_strategy_trains(tmp_path):
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "model_garden.train", "--strategy=mirrored",
         "--epochs=1", "--batch_size=32", "--max_train_records=64",
         "--max_test_records=32", "--verbose=0", f"--model_dir={model_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=_environment(),
        timeout=JOB_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["strategy"] == "mirrored"
    assert summary["policy"] == "dfp16"


def test_cli_multi_worker_fit_trains(tmp_path):
    """Run the CLI's `Model.fit` path with two MultiWorkerMirroredStrategy workers."""
    model_dir = tmp_path / "run"
    ports = _free_ports(2)
    command = [sys.executable, "-m", "model_garden.train", "--strategy=multi_worker",
               "--epochs=1", "--batch_size=32", "--max_train_records=64",
               "--max_test_records=32", "--verbose=0", f"--model_dir={model_dir}"]
    # The logs go to files, because the CLI logs more than a pipe buffer holds.
    # A worker blocked on a full pipe would also block the other worker's all-reduce.
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]
    workers = []
    try:
        for index, log in enumerate(logs):
            with open(log, "w", encoding="utf-8") as log_file:
                workers.append(
                    _start_command(command, stdout=log_file,
                                   TF_CONFIG=_tf_config(ports, index))
                )
        for worker in workers:
            worker.wait(timeout=JOB_TIMEOUT_SECONDS)
    finally:
        for worker in workers:
            _kill(worker)
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log.read_text()[-3000:]

    # Worker 0 is the chief and writes to --model_dir. Worker 1 writes to a
    # subdirectory, so the workers never write the same file.
    summaries = [
        json.loads((directory / "summary.json").read_text())
        for directory in (model_dir, model_dir / "worker1")
    ]
    for summary in summaries:
        assert summary["strategy"] == "multi_worker"
        assert summary["policy"] == "dfp16"
    assert (model_dir / "cifar_cnn.keras").is_file()
    assert (model_dir / "worker1" / "cifar_cnn.keras").is_file()
    # The logged loss is the mean over both workers' replicas, and evaluation
    # runs on both, so the workers report the same numbers.
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
    # BackupAndRestore deletes each worker's backup when fit ends.
    assert not (model_dir / "backup").exists()
    assert not (model_dir / "worker1" / "backup").exists()


def test_cli_multi_worker_requires_tf_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "model_garden.train", "--strategy=multi_worker",
         "--epochs=1", "--batch_size=32", "--max_train_records=32",
         f"--model_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=_environment(),
        timeout=JOB_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Expected TF_CONFIG to describe the cluster" in result.stderr
