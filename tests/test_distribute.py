"""EWC under tf.distribute: the same numbers on one device, two replicas, two workers.

Two logical CPU devices must be configured before TensorFlow initialises, so the checks
run in a fresh process (`tests/_distribute_checks.py`, once for the module) and these
tests assert on the numbers it reports. The multi-worker tests start worker processes
(`tests/_worker.py`) on 127.0.0.1 and are marked slow.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_ewc import distribute

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL = 1e-5


def _run_checks():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, os.path.join(HERE, "_distribute_checks.py")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"The distribution checks failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checks():
    return _run_checks()


def result(checks, name):
    value = checks[name]
    assert "error" not in value, value.get("error")
    return value


def test_shard_bounds_cover_the_batch_once_and_evenly():
    for size in range(0, 12):
        for replicas in (1, 2, 3, 4):
            bounds = [distribute.shard_bounds(size, replicas, r) for r in range(replicas)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_mirrored_fit_and_consolidate_equal_one_device(checks):
    # Consolidate on task A (batches of 20 over 96 examples: ragged last batch), shift
    # the weights, fit task B for 2 epochs with SGD, consolidate task B.
    r = result(checks, "mirrored_training")
    assert r["replicas"] == 2
    assert r["penalty_positive"] and r["weights_moved"] > 1e-2  # a real, moving run
    assert r["fisher"] < TOL
    assert r["penalty0"] < TOL
    assert r["logged"] < TOL  # the logged penalty counts once, as on one device
    assert r["weights"] < TOL
    assert r["state"] < TOL


def test_penalty_gradient_counts_once_across_replicas(checks):
    # Sum over replicas of each replica's gradient of compute_loss equals the one-device
    # gradient; an unscaled penalty would put 2x its gradient into the sum (strength 500).
    assert result(checks, "gradient_once")["gradient"] < TOL


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
@pytest.mark.parametrize("batch", [8, 41, 1])
def test_sharded_fisher_equals_one_device(checks, estimator, batch):
    # 41 examples: batch 8 leaves a last batch of 1 (one replica's shard is empty),
    # batch 41 is one odd batch (shards of 21 and 20), batch 1 leaves a shard empty always.
    assert result(checks, "consolidate_estimators")[f"{estimator}/{batch}"] < TOL


def test_validation_and_atomicity_under_a_strategy(checks):
    r = result(checks, "validation_under_strategy")
    assert r["errors"]["nan"].startswith("The data's inputs contain NaN")
    assert r["errors"]["labels"].startswith("Expected labels in [0, 3)")
    assert r["errors"]["empty"].startswith("The data holds no examples")
    assert r["unchanged"] and r["tasks"] == 1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_state_in_float32(checks, policy):
    r = result(checks, "mixed_precision")[policy]
    assert r["compute_dtype"] == policy.split("_")[1]  # the policy really applied
    assert r["fisher_dtypes"] == ["float32"]
    assert r["state_dtypes"] == ["float32"]
    assert r["penalty_dtype"] == "float32"
    # A Fisher of 1e-12 (0 in float16) is held and penalises: ½ λ Σ 1e-12 · 1².
    np.testing.assert_allclose(r["tiny_precision"], [1e-12, 1e-12], rtol=1e-6)
    np.testing.assert_allclose(r["tiny_penalty_ratio"], 1.0, rtol=1e-5)
    # The Fisher from low-precision activations is close to the float32 one
    # (float16: 10-bit mantissa; bfloat16: 7-bit).
    assert r["fisher_err"] < (2e-3 if policy == "mixed_float16" else 2e-2)
    # Training (with a LossScaleOptimizer for float16) stays finite with the penalty on.
    assert r["loss_finite"] and r["penalty"] > 1.0 and r["logged_penalty"] > 1.0


# --- several processes ----------------------------------------------------------------


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(out, env_extra=None, args=()):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, os.path.join(HERE, "_worker.py"), str(out),
                             *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _cluster(tmp_path, tag, args_for=lambda index: (), workers=2, timeout=150):
    """Runs `workers` processes as one multi-worker cluster; returns their exit codes."""
    ports = _free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for index in range(workers):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(_start(tmp_path / f"{tag}{index}.npz", {"TF_CONFIG": config},
                                args_for(index)))
        codes = []
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"A worker did not finish in {timeout} s:\n"
                            + proc.stdout.read()[-3000:] if proc.poll() is not None else
                            f"A worker did not finish in {timeout} s.")
            codes.append(proc.returncode)
        return codes, [p.stdout.read()[-3000:] for p in procs]
    finally:
        for proc in procs:  # stop whatever is left, on success or failure
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _single(tmp_path, timeout=120):
    proc = _start(tmp_path / "single.npz")
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, out[-3000:]
    return dict(np.load(tmp_path / "single.npz"))


def _assert_same(result, reference):
    assert int(result["replicas"]) == 2 and int(reference["replicas"]) == 1
    assert int(result["tasks"]) == int(reference["tasks"]) == 2
    assert int(reference["first_epoch"]) == 0
    for key in reference:
        if key in ("replicas", "tasks", "first_epoch"):
            continue
        np.testing.assert_allclose(result[key], reference[key], rtol=TOL,
                                   atol=TOL * np.max(np.abs(reference[key])), err_msg=key)


@pytest.mark.slow
def test_two_workers_train_and_consolidate_as_one_process(tmp_path):
    reference = _single(tmp_path)
    codes, logs = _cluster(tmp_path, "worker")
    assert codes == [0, 0], logs
    for index in range(2):
        result = dict(np.load(tmp_path / f"worker{index}.npz"))
        assert int(result["first_epoch"]) == 0
        _assert_same(result, reference)


@pytest.mark.slow
def test_a_worker_killed_mid_fit_resumes_from_backup_to_the_same_result(tmp_path):
    # Worker 1 dies abruptly at the end of epoch 2 of 4 (after its backup callback ran);
    # worker 0, stuck waiting for it in a collective, is stopped, as a cluster manager
    # would. Both restart with the same backup directories and finish the run.
    reference = _single(tmp_path)
    backups = [str(tmp_path / f"backup{i}") for i in range(2)]
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}

    def config(index):
        return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}})}

    procs = [_start(tmp_path / "crash0.npz", config(0), ("--backup", backups[0])),
             _start(tmp_path / "crash1.npz", config(1),
                    ("--backup", backups[1], "--die-after-epoch", "1"))]
    try:
        assert procs[1].wait(timeout=150) == 3, procs[1].stdout.read()[-3000:]
        try:
            procs[0].wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert not (tmp_path / "crash0.npz").exists()  # the first run did not finish
    assert all(os.listdir(b) for b in backups)  # but left backups behind
    codes, logs = _cluster(tmp_path, "resumed",
                           args_for=lambda index: ("--backup", backups[index]))
    assert codes == [0, 0], logs
    for index in range(2):
        resumed = dict(np.load(tmp_path / f"resumed{index}.npz"))
        assert int(resumed["first_epoch"]) == 2  # resumed after the 2 backed-up epochs
        _assert_same(resumed, reference)
