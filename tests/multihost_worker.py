"""One process of a multi-host run on this machine.

    python -m tests.multihost_worker ID N PORT OUT

Each process owns 2 CPU devices and feeds its own slice of the global batch; process 0 writes
the final adapter to OUT (an .npz). The same code runs unchanged on a TPU pod's hosts.
"""

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import c3a_jax as c3a
from tests import toy

STEPS, GLOBAL_BATCH = 4, 32


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # read when JAX starts
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
  )

  mesh = c3a.training.make_mesh(data=-1, fsdp=2)
  final = train(mesh, process_id, num_processes)
  params = multihost_utils.process_allgather(final.params, tiled=True)
  if process_id == 0:
    flat = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(out, **flat)


def train(mesh, process_id=0, num_processes=1):
  """The run the test compares: sharded jit over `mesh`, this process's slice of each batch."""
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  state = c3a.TrainState.create(adapter, tx, rng=0)
  state_sh, base_sh = (
    c3a.training.param_shardings(state, mesh),
    c3a.training.param_shardings(base, mesh),
  )
  state, base = jax.device_put(state, state_sh), jax.device_put(base, base_sh)
  step = jax.jit(c3a.make_train_step(toy.loss_fn(), tx), out_shardings=(state_sh, None))
  per_process = GLOBAL_BATCH // num_processes
  for i in range(STEPS):
    data = toy.data(GLOBAL_BATCH, seed=i)
    local = {
      k: v[process_id * per_process : (process_id + 1) * per_process] for k, v in data.items()
    }
    state, _ = step(state, base, c3a.training.shard_batch(local, mesh))
  return state


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
