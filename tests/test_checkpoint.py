"""Orbax training checkpoints: exact resume, keep-last-N, other meshes, refusals, killed saves."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import c3a_jax as c3a
from tests import backend, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(position, size=16):
  """A deterministic data stream: the batch at any position can be rebuilt on resume."""
  data = toy.data(256, seed=position)
  return {k: v[:size] for k, v in data.items()}


def setup(model=toy.MLP(dropout=0.3)):
  adapter, base = c3a.split(toy.params(), toy.CFG)
  tx = toy.tx()
  step = jax.jit(c3a.make_train_step(toy.loss_fn(model), tx))
  return step, c3a.TrainState.create(adapter, tx, rng=7), base


def train(step, state, base, start, stop):
  for position in range(start, stop):
    state, _ = step(state, base, batches(position))
  return state


def test_stop_and_resume_equals_an_unbroken_run(tmp_path):
  step, state, base = setup()
  unbroken = train(step, state, base, 0, 6)

  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    first = train(step, state, base, 0, 3)
    ckpt.save(first, data_position=3)  # asynchronous
  # A new run: fresh state as the target, everything else from the checkpoint.
  step, fresh, base = setup()
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    restored, position = ckpt.restore(fresh)
  assert position == 3 and int(restored.step) == 3
  resumed = train(step, restored, base, position, 6)
  jax.tree.map(np.testing.assert_array_equal, resumed, unbroken)  # bit-exact, RNG included


def test_restores_a_0_1_checkpoint_whose_config_held_a_strategy(tmp_path, monkeypatch):
  """c3a-jax 0.1 wrote C3AConfig.strategy into the checkpoint's config; 0.2 has no such field."""
  step, state, base = setup()
  state = train(step, state, base, 0, 2)
  to_dict = c3a.C3AConfig.to_dict
  monkeypatch.setattr(c3a.C3AConfig, "to_dict", lambda self: {**to_dict(self), "strategy": "dft"})
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    ckpt.save(state, data_position=2)
  monkeypatch.undo()
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    restored, position = ckpt.restore(setup()[1])
  assert position == 2
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_keeps_the_last_n_and_never_writes_the_base(tmp_path):
  big = {"big": {"kernel": jnp.ones((512, 512)), "c3a_kernel": jnp.ones((4, 4, 128))}}
  adapter, base = c3a.split(big)
  tx = toy.tx()
  state = c3a.TrainState.create(adapter, tx)
  with c3a.training.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for s in range(1, 6):
      ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)), data_position=s)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
  base_bytes = np.asarray(base["big"]["kernel"]).nbytes  # 1 MiB
  assert size < base_bytes / 2


@pytest.mark.integration
def test_restore_onto_another_mesh(tmp_path):
  step, state, base = setup(toy.MLP())
  mesh = backend.cpu_mesh(data=4, fsdp=2)
  sharded = jax.device_put(state, c3a.training.param_shardings(state, mesh))
  assert sharded.params["fc0"]["c3a_kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  sharded = train(
    step, sharded, jax.device_put(base, c3a.training.param_shardings(base, mesh)), 0, 2
  )
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(sharded, data_position=2)
  other = c3a.training.make_mesh(data=2, fsdp=4, devices=backend.cpu_devices(8)[::-1])
  target = jax.device_put(state, c3a.training.param_shardings(state, other))
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    restored, _ = ckpt.restore(target)
  kernel = restored.params["fc1"]["c3a_kernel"]
  assert kernel.sharding.mesh.devices.shape == (2, 4)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, sharded
  )
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:  # and onto one device
    single, _ = ckpt.restore(jax.device_put(state, backend.cpu_devices(1)[0]))
  np.testing.assert_array_equal(single.params["fc1"]["c3a_kernel"], kernel)


def test_refuses_a_checkpoint_of_another_config_or_model(tmp_path):
  _, state, _ = setup()
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    ckpt.save(state)
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG.replace(block_size=4)) as ckpt:
    with pytest.raises(
      ValueError,
      match=r"another config or model:\n  config field block_size: "
      r"checkpoint has 8, here 4",
    ):
      ckpt.restore(state)
  wider = state.replace(params={**state.params, "fc0": {"c3a_kernel": jnp.ones((8, 2, 4))}})
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(
      ValueError,
      match=r"state leaf \.params\['fc0'\]\['c3a_kernel'\]: "
      r"checkpoint has \[\[4, 2, 8\], 'float32'\], here \[\[8, 2, 4\]",
    ):
      ckpt.restore(wider)
  with c3a.training.Checkpointer(str(tmp_path / "empty")) as ckpt:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore(state)


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp, optax, c3a_jax as c3a
    tx = optax.sgd(1.0)
    state = c3a.TrainState.create({"w": {"c3a_kernel": jnp.ones((64, 64, 256))}}, tx)
    ckpt = c3a.training.Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(state.replace(step=jnp.asarray(1, jnp.int32)), data_position=1)
    ckpt.wait()
    big = state.replace(step=jnp.asarray(2, jnp.int32), params={"w": {"c3a_kernel":
                        2 * jnp.ones((64, 64, 256))}}, opt_state=jnp.ones((256, 1024, 256)))
    ckpt.save(big, data_position=2)   # returns at once; the write goes on in the background
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.integration
def test_a_save_killed_midway_loses_nothing_already_saved(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-c", KILLED_SAVE, str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == -9, proc.stderr[-2000:]
  # The kill landed mid-save: step 2 is an unfinished temporary directory.
  assert any(d.startswith("2.") and "tmp" in d for d in os.listdir(tmp_path)), os.listdir(tmp_path)
  tx = __import__("optax").sgd(1.0)
  # The child saved a key of JAX's default PRNG (conftest switches this process to another).
  key = jax.random.key(0, impl="threefry2x32")
  target = c3a.TrainState.create({"w": {"c3a_kernel": jnp.zeros((64, 64, 256))}}, tx, rng=key)
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1
    restored, position = ckpt.restore(target)
  assert position == 1 and float(restored.params["w"]["c3a_kernel"].min()) == 1.0


def _flip_bytes(step_dir):
  """Flips bytes in the middle of a saved step's largest array data file (orbax's ``state/d/``),
  as a bad disk would."""
  data_dir = os.path.join(step_dir, "state", "d")
  target = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
  open(target, "wb").write(bytes(data))


@pytest.mark.integration  # orbax round trips: slow for the default tier
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  step, state, base = setup()
  with c3a.training.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    first = train(step, state, base, 0, 2)
    ckpt.save(first, data_position=2)
    second = train(step, first, base, 2, 4)
    ckpt.save(second, data_position=4)
  _flip_bytes(tmp_path / "4")
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(c3a.training.CorruptCheckpointError, match=r"/4 is corrupt"):
      ckpt.restore(setup()[1], step=4)  # a step asked for: no fallback
    with pytest.warns(UserWarning, match=r"checkpoint .*/4 is corrupt.*restoring an earlier"):
      restored, position = ckpt.restore(setup()[1])
    assert position == 2
    jax.tree.map(np.testing.assert_array_equal, restored, first)
    # Moved aside, not deleted, so that the resumed run can save step 4 again.
    assert ckpt.all_steps() == [2] and (tmp_path / "4.corrupt").is_dir()
    ckpt.save(train(step, restored, base, 2, 4), data_position=4)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
  # Arrays that read but differ from what was saved: their checksums tell. (Here the checksums
  # change, the digest of the metadata made to match, as if the arrays had.)
  from c3a_jax.training._checkpoint import _digest

  meta_file = tmp_path / "2" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  leaf = sorted(meta["checksums"])[0]
  meta["checksums"][leaf][0] += 1
  meta["digest"] = _digest(meta)
  meta_file.write_text(json.dumps(meta))
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(
      c3a.training.CorruptCheckpointError, match=r"/2 is corrupt: 1 arrays differ"
    ):
      ckpt.restore(setup()[1], step=2)
  meta_file.write_text("{not json")
  with c3a.training.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(c3a.training.CorruptCheckpointError, match=r"metadata does not read"):
      ckpt.restore(setup()[1], step=2)


def _flip_bit(path, position):
  data = bytearray(open(path, "rb").read())
  data[position] ^= 0x01
  open(path, "wb").write(bytes(data))


def _two_checkpoints(directory):
  step, state, base = setup()
  first = train(step, state, base, 0, 2)
  second = train(step, first, base, 2, 4)
  with c3a.training.Checkpointer(str(directory), config=toy.CFG, async_save=False) as ckpt:
    ckpt.save(first, data_position=2)
    ckpt.save(second, data_position=4)
  return first, second


@pytest.mark.integration  # about a hundred restores
def test_every_file_a_restore_reads_is_covered(tmp_path):
  """One flipped bit anywhere in a checkpoint: restored exactly as saved, or refused as corrupt.
  Never another state or data position (the metadata's data_position, 4 -> 5, was resumed)."""
  _, second = _two_checkpoints(tmp_path)
  meta = tmp_path / "4" / "meta" / "metadata"
  text = meta.read_bytes()
  _flip_bit(meta, text.index(b'"data_position": 4') + len(b'"data_position": '))
  assert b'"data_position": 5' in meta.read_bytes()
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    with pytest.raises(c3a.training.CorruptCheckpointError, match=r"/4 is corrupt: its metadata"):
      ckpt.restore(setup()[1], step=4)
  meta.write_bytes(text)
  files = sorted(p for p in (tmp_path / "4").rglob("*") if p.is_file())
  outcomes = {}
  for path in files:
    original = path.read_bytes()
    for position in sorted({0, len(original) // 3, len(original) // 2, len(original) - 2}):
      _flip_bit(path, position)
      try:
        with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
          restored, data_position = ckpt.restore(setup()[1], step=4)
        assert data_position == 4, (path, position)
        jax.tree.map(np.testing.assert_array_equal, restored, second)
        outcome = "as saved"
      except c3a.training.CorruptCheckpointError:
        outcome = "corrupt"
      outcomes.setdefault(str(path.relative_to(tmp_path)), set()).add(outcome)
      path.write_bytes(original)
  # What a restore reads is among them: the metadata, the arrays' tree and their data.
  assert outcomes["4/meta/metadata"] == {"corrupt"}
  assert outcomes["4/state/_METADATA"] == {"corrupt"}


@pytest.mark.integration
def test_a_restore_with_no_whole_checkpoint_names_every_corrupt_one(tmp_path):
  _two_checkpoints(tmp_path)
  _flip_bytes(tmp_path / "4")
  _flip_bytes(tmp_path / "2")
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    with pytest.warns(UserWarning, match=r"/4 is corrupt"):
      whole = r"no checkpoint .* is whole: .*/4 is corrupt.*/2 is corrupt"
      with pytest.raises(c3a.training.CorruptCheckpointError, match=whole):
        ckpt.restore(setup()[1])
  assert sorted(os.listdir(tmp_path)) == ["2", "4"]  # nothing moved: it is for the user to decide


@pytest.mark.integration
def test_a_copied_step_directory_is_set_aside(tmp_path):
  """``cp -r 2 5``: step 5's directory holds step 2. Restored as 5, the run would save step 4
  again over the one that exists."""
  import shutil

  _, second = _two_checkpoints(tmp_path)
  shutil.copytree(tmp_path / "2", tmp_path / "5")
  with c3a.training.Checkpointer(str(tmp_path), config=toy.CFG) as ckpt:
    with pytest.warns(UserWarning, match=r"checkpoint .*/5 holds step 2, not 5"):
      restored, position = ckpt.restore(setup()[1])
    assert position == 4 and int(restored.step) == 4
    jax.tree.map(np.testing.assert_array_equal, restored, second)
    assert ckpt.all_steps() == [2, 4] and (tmp_path / "5.corrupt").is_dir()
