"""Speed and accelerator options agree with the plain computation they replace."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from model_tester import train_loss_and_grads

from fcn_jax.models import UNet, create_model
from fcn_jax.models.pooling import max_pool_argmax_gradient


@pytest.mark.parametrize("shape", [(2, 8, 3), (2, 8, 6, 3), (1, 4, 6, 8, 2)])
def test_argmax_max_pool_matches_autodiff_of_xla_max_pool(shape):
    rank = len(shape) - 2
    x = jax.random.normal(jax.random.key(0), shape)

    def reference(x):
        return nn.max_pool(x, (2,) * rank, strides=(2,) * rank)

    cotangent = jax.random.normal(jax.random.key(1), reference(x).shape)
    expected_out, expected_vjp = jax.vjp(reference, x)
    out, vjp = jax.vjp(lambda x: max_pool_argmax_gradient(x, 2), x)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_array_equal(vjp(cotangent)[0], expected_vjp(cotangent)[0])


@pytest.fixture(scope="module")
def fixed_batch():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    labels = jax.random.randint(jax.random.key(2), (2, 32, 32), 0, 2)
    return images, labels


@pytest.mark.long
@pytest.mark.parametrize(
    "option",
    [
        {"max_pool_gradient": "argmax"},
        {"batch_norm_relu": "fused"},
        {"skip_conv": "split"},
        {"remat": True},
    ],
    ids=str,
)
def test_cpu_and_memory_options_leave_loss_and_gradients_unchanged(option, fixed_batch):
    images, labels = fixed_batch
    xla = {"max_pool_gradient": "xla", "batch_norm_relu": "xla"}
    plain = UNet(2, depth=2, base_width=4, **xla)
    variant = UNet(2, depth=2, base_width=4, **{**xla, **option})
    expected = train_loss_and_grads(plain, images, labels)
    got = train_loss_and_grads(variant, images, labels)
    np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(expected.grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_max_pool_gradient_is_argmax_on_cpu():
    model = create_model(
        {"name": "unet", "num_classes": 2, "max_pool_gradient": "auto"}
    )
    assert model.max_pool_gradient == (
        "argmax" if jax.default_backend() == "cpu" else "xla"
    )


@pytest.mark.long
def test_bfloat16_compute_agrees_with_float32(fixed_batch):
    """bf16 activations, float32 params/logits/loss: loss within 1% relative,
    gradients pointing the same way (cosine > 0.95; bf16 keeps 8 mantissa bits,
    so per-element gradients of a random network differ by several percent)."""
    images, labels = fixed_batch
    float32 = UNet(2, depth=3, base_width=8)
    bfloat16 = UNet(2, depth=3, base_width=8, dtype=jnp.bfloat16)
    expected = train_loss_and_grads(float32, images, labels)
    got = train_loss_and_grads(bfloat16, images, labels)
    jax.tree.map(np.testing.assert_array_equal, got.variables, expected.variables)
    assert got.logits.dtype == jnp.float32 and got.loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got.grads))
    np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-2)
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(expected.grads)])
    bf_flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(got.grads)])
    cosine = flat @ bf_flat / (jnp.linalg.norm(flat) * jnp.linalg.norm(bf_flat))
    assert cosine > 0.95


@pytest.mark.long
def test_benchmark_script_runs_on_a_tiny_config(tmp_path, data_dir):
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "benchmark.py"),
        f"--config={REPO_ROOT / 'configs' / 'unet.py'}:runlocal",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={tmp_path}",
        "--name=tiny",
        "--repeats=2",
        "--pytorch=false",
        "--matmul_size=256",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "benchmark_tiny.json") as f:
        report = json.load(f)
    assert report["train_gflop_per_step"] > 0
    assert 0 < report["train_fraction_of_peak"]
    assert report["matmul_peak_gflop_per_s"] >= report["matmul_in_process_gflop_per_s"]
    assert report["pipeline_batches_per_s"] > 0
