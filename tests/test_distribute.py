"""EWC under tf.distribute: the same numbers on one device, two replicas, two workers.

Two logical CPU devices must be configured before TensorFlow initialises, so the checks
run in a fresh process (`tests/_distribute_checks.py`, once for the module) and these
tests assert on the numbers it reports. The multi-worker tests start worker processes
(`tests/_worker.py`) on 127.0.0.1 and are marked slow.
"""

import json
import os
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
