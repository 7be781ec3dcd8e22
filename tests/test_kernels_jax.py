"""Every built-in Fisher kernel runs on JAX and is exact to a per-example oracle.

Keras picks its backend at import, and this suite imports it on TensorFlow, so the
checks run in one fresh process with KERAS_BACKEND=jax (`tests/_kernels_jax_checks.py`,
once for the module: its docstring says what is compared), and these tests assert on
the numbers it reports. Tolerance: 1e-5 of the largest oracle value, for each variable,
with the kernels' default memory budget and with chunks of one example; a few
compiled kernels run again at new weights.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

pytestmark = pytest.mark.slow  # one JAX process for every case: about a minute

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL = 1e-5
CASES = [
    "dense_flat", "dense_sequence", "dense_two_calls", "einsum_dense_flat",
    "einsum_dense_sequence", "embedding", "conv1d_same_strided", "conv1d_causal_dilated",
    "conv2d_same", "conv2d_groups_dilated", "conv3d", "conv3d_dilated",
    "conv1d_transpose", "conv2d_transpose", "conv3d_transpose", "depthwise1d",
    "depthwise2d_dilated", "depthwise2d_strided", "separable1d", "separable2d",
    "layer_norm", "batch_norm_inference", "group_norm",
]


@pytest.fixture(scope="module")
def checks():
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, os.path.join(HERE, "_kernels_jax_checks.py")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"The JAX kernel checks failed:\n{done.stderr[-4000:]}")
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            found[result["case"]] = result
    return found


def test_every_case_ran(checks):
    assert sorted(checks) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_kernel_on_jax_matches_oracle(checks, case):
    result = checks[case]
    assert "error" not in result, result.get("error")
    # The kernel covers every trainable variable of the layer, and only those.
    assert result["covered"] == result["trainable"]
    for path, entry in result["variables"].items():
        assert entry["shape_ok"], path
        assert entry["scale"] > 1e-3, path  # a real Fisher, not zeros on both sides
        assert entry["whole"] <= TOL, (path, entry)
        assert entry["chunked"] <= TOL, (path, entry)


@pytest.mark.parametrize("case", ["dense_flat", "separable2d", "batch_norm_inference"])
def test_compiled_kernel_takes_the_weights_as_arguments(checks, case):
    # The jitted kernel run again at new weights (passed through keras.StatelessScope,
    # moving statistics included) matches the oracle at those weights, and the Fisher
    # did move with them (a bias's need not: BatchNormalization's β sees no weight).
    entries = checks[case]["variables"]
    assert max(entry["moved"] for entry in entries.values()) > 1e-2
    for path, entry in entries.items():
        assert entry["new_weights"] <= TOL, (path, entry)
