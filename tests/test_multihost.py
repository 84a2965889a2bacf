"""Two processes under jax.distributed.initialize (CPU collectives) train as one process does."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import backend, multihost_worker

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out, port = str(tmp_path / "adapter.npz"), free_port()
  # Each worker owns 2 host CPU devices (it sets XLA_FLAGS), whatever accelerator this host has.
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", str(i), "2", str(port), out],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  # One process, the same 4-device (data=2, fsdp=2) mesh, the whole batch.
  mesh = backend.cpu_mesh(data=2, fsdp=2)
  single = multihost_worker.train(mesh)
  got = np.load(out)
  want = {
    jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(single.params)[0]
  }
  assert sorted(got.files) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
