"""What the tests must know about the backend they run on, kept in one place (DESIGN.md section 10).

Devices: a test that needs several devices takes the host CPU devices, which tests/conftest.py
makes 8 of, whatever the default backend is; one GPU or TPU chip cannot give a (data, fsdp) mesh.

Precision: XLA's default float32 matmul is TF32 on NVIDIA GPUs and one bfloat16 pass on TPUs.
C3A's own math states its precision (the tests marked ``backend_precision`` check that), but a
frozen layer's own ``x @ kernel`` keeps the user's, so the other tests, which compare whole
layers and models against float32 references, run in :func:`float32_matmuls`.
"""

import contextlib

import jax
import pytest

import c3a_jax as c3a


def cpu_devices(n=None):
  """The host CPU devices (the first ``n``), skipping the test where fewer than ``n`` exist.

  Fewer than 8 only where XLA_FLAGS already set a device count, which conftest then keeps.
  """
  devices = jax.devices("cpu")
  if n is not None and len(devices) < n:
    pytest.skip(f"needs {n} CPU devices, XLA_FLAGS gives {len(devices)}")
  return devices[:n]


def cpu_mesh(data, fsdp=1):
  """``make_mesh(data=, fsdp=)`` over the first ``data * fsdp`` host CPU devices."""
  return c3a.training.make_mesh(data=data, fsdp=fsdp, devices=cpu_devices(data * fsdp))


def on_one_cpu():
  """Runs what JAX places by default on one CPU device: the single-device twin of a CPU mesh,
  so that both sides of a comparison round alike on any default backend."""
  return jax.default_device(cpu_devices(1)[0])


def float32_matmuls():
  """Full float32 for the matmuls XLA would otherwise round (TF32, bfloat16 passes); nothing on
  the CPU, whose default is float32 already, so CPU runs keep their jit caches and timing."""
  if jax.default_backend() == "cpu":
    return contextlib.nullcontext()
  return jax.default_matmul_precision("highest")
