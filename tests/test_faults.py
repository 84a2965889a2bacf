"""Faults a user or a cluster causes: nothing a user owns is deleted, runs do not collide, a
stopped run saves and resumes, and bad input is one clear line. (The run directory's rules are
in c3a_jax/cli/rundir.py; the README's Reliability section lists the guarantees.)

Faults tested beside the code they concern: kill -9 inside a save and corrupt checkpoints
(test_checkpoint.py); adapters PEFT would read differently, DistilBERT's adapted head
(test_peft_io.py); float64 under x64 (test_ops.py, test_transform.py); a lossy bfloat16 merge,
merge(safe=True) on NaN, attach(None) (test_transform.py); config types and ranges, numpy block
sizes (test_config.py)."""

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from c3a_jax import cli
from c3a_jax.cli import rundir, runner
from c3a_jax.cli.experiment import Experiment
from c3a_jax.cli.job import Job
from tests.run_dirs import ROOT, cache  # noqa: F401 (cache: an autouse fixture)
from tests.run_dirs import exp as _exp
from tests.run_dirs import fake_run as _fake_run


def test_overwrite_refuses_a_directory_without_the_marker(tmp_path):
  # A config.yaml of the user's own does not make a run.
  proj = tmp_path / "proj"
  proj.mkdir()
  (proj / "config.yaml").write_text("lr: 0.1\n")
  (proj / "model_epoch_90.pt").write_text("w")
  with pytest.raises(rundir.RunDirError, match=r"holds no c3a-jax run \(no \.c3a-jax-run\.json\)"):
    runner.prepare_dir(_exp(proj), resume=False, overwrite=True)
  assert sorted(os.listdir(proj)) == ["config.yaml", "model_epoch_90.pt"]
  assert (proj / "config.yaml").read_text() == "lr: 0.1\n"


def test_overwrite_deletes_only_what_the_marker_lists(tmp_path):
  out = tmp_path / "run"
  exp = _fake_run(out)
  (out / "notes.txt").write_text("mine")
  with rundir.locked(str(out)):
    runner.prepare_dir(exp, resume=False, overwrite=True)
  assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
  assert (out / "notes.txt").read_text() == "mine"
  assert rundir.is_run(str(out)) and (out / "config.yaml").is_file()


def test_overwrite_never_deletes_through_a_link(tmp_path):
  out = tmp_path / "run"
  exp = _fake_run(out)
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "data.bin").write_text("keep")
  (out / "checkpoints" / "10" / "link").symlink_to(precious)
  with pytest.raises(rundir.RunDirError, match=r"checkpoints/10/link is a symbolic link.*Nothing"):
    runner.prepare_dir(exp, resume=False, overwrite=True)
  # Checked before anything was deleted: every entry and the link's target are still there.
  assert (out / "summary.json").exists() and (out / "checkpoints" / "10" / "state").exists()
  assert (precious / "data.bin").read_text() == "keep"


def test_a_marker_that_names_a_path_outside_is_refused(tmp_path):
  out = tmp_path / "run"
  exp = _fake_run(out)
  (tmp_path / "outside.txt").write_text("keep")
  marker = out / rundir.MARKER
  marker.write_text(json.dumps({"entries": ["summary.json", "../outside.txt"]}))
  with pytest.raises(rundir.RunDirError, match=r"lists '\.\./outside\.txt', not a name inside"):
    runner.prepare_dir(exp, resume=False, overwrite=True)
  assert (tmp_path / "outside.txt").exists() and (out / "summary.json").exists()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
  out = tmp_path / "run"
  with rundir.locked(str(out)):
    with pytest.raises(
      rundir.RunDirError, match=rf"in use by another c3a-jax process \(pid {os.getpid()}\)"
    ):
      with rundir.locked(str(out)):
        pass
  with rundir.locked(str(out)):  # released when the holder is done
    pass


def test_merge_refuses_the_base_model_the_run_and_a_full_directory(tmp_path, capsys):
  base = tmp_path / "base"
  base.mkdir()
  (base / "config.json").write_text("{}")
  run = tmp_path / "run"
  run.mkdir()
  config = {"task": "seq_cls", "model": {"name": str(base)}, "data": {"name": "train.csv"}}
  (run / "config.yaml").write_text(yaml.safe_dump(config))
  other = tmp_path / "other"
  other.mkdir()
  (other / "README.md").write_text("mine")
  cases = [
    (base, "is the base model's directory"),
    (run / "merged", "is inside the run directory"),
    (other, "is not empty; pass --overwrite"),
  ]
  for out_dir, message in cases:
    assert cli.main(["merge", str(run), str(out_dir)]) == 2
    assert message in capsys.readouterr().err
  assert cli.main(["merge", str(run), str(base), "--overwrite"]) == 2  # never the base
  assert "is the base model's directory" in capsys.readouterr().err
  assert sorted(os.listdir(base)) == ["config.json"] and (other / "README.md").exists()


@pytest.mark.integration
def test_a_running_directory_refuses_a_second_run(tmp_path, capsys):
  out = tmp_path / "run"
  with rundir.locked(str(out)):
    assert cli.main(["train", "--quiet", f"output_dir={out}", "train.steps=5"]) == 2
  assert f"in use by another c3a-jax process (pid {os.getpid()})" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize(
  "sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_stopped_run_saves_a_checkpoint_and_resume_finishes(tmp_path, sig, status):
  """Ctrl-C, or a scheduler's SIGTERM: the step finishes, a checkpoint is saved, and the run
  exits with the shell's status for the signal; --resume takes it to the end."""
  out = tmp_path / "run"
  args = [
    f"output_dir={out}",
    "train.save_every=1000000",
    "train.eval_every=1000000",
    "train.mode=head",
  ]
  proc = subprocess.Popen(
    [sys.executable, "-m", "c3a_jax", "train", "--quiet", "train.steps=1000000", *args],
    cwd=ROOT,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 120
  while time.time() < deadline and not (out / "metrics.jsonl").exists():
    time.sleep(0.2)
  time.sleep(0.5)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == status, err[-2000:]
  assert f"stopped by {sig.name} at step" in err
  assert "checkpoint saved; continue with --resume" in err
  steps = [int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and steps[0] > 0
  assert cli.main(["train", "--quiet", "--resume", f"train.steps={steps[0] + 5}", *args]) == 0
  assert json.load(open(out / "summary.json"))["steps"] == steps[0] + 5


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_config_values_are_refused(value):
  with pytest.raises(ValueError, match=r"train.lr: Input should be a finite number"):
    Experiment.from_dict({}, overrides=[f"train.lr={value}"])
  with pytest.raises(ValueError, match=r"train.weight_decay: Input should be a finite number"):
    Experiment.from_dict({}, overrides=[f"train.weight_decay={value}"])


def _toy_job(train_labels, eval_labels):
  x = np.zeros((len(train_labels), 4), np.float32)
  return Job(
    logits_fn=lambda p, b, rng, train: b["x"] @ p["w"],
    params={"w": np.zeros((4, 3), np.float32)},  # three classes
    train_data={"x": x, "labels": np.asarray(train_labels)},
    eval_data={"x": x[: len(eval_labels)], "labels": np.asarray(eval_labels)},
  )


def test_labels_outside_the_models_outputs_are_refused_before_training():
  # Inside jit an out-of-range label is no error: JAX clamps or wraps it, silently.
  exp = _exp("unused", batch_size=2)
  runner._check_fits(exp, _toy_job([0, 1, 2, 1], [0, 2]))  # fine
  with pytest.raises(ValueError, match=r"train example 2 has label 3, but the model has 3 outputs"):
    runner._check_fits(exp, _toy_job([0, 1, 3, 1], [0, 2]))
  with pytest.raises(ValueError, match=r"eval example 1 has label -1, .*valid: 0 to 2"):
    runner._check_fits(exp, _toy_job([0, 1, 2, 1], [0, -1]))


@pytest.mark.integration
def test_a_run_that_goes_non_finite_stops_and_writes_nothing_bad(tmp_path, capsys):
  out = tmp_path / "run"
  args = [f"output_dir={out}", "train.lr=1e30", "train.steps=40", "train.save_every=1"]
  assert cli.main(["train", "--quiet", *args]) == 2
  bad = int(re.search(r"became non-finite at step (\d+)", capsys.readouterr().err).group(1))
  assert not (out / "adapter").exists() and not (out / "summary.json").exists()
  # Saved every step until then, and never at or after the bad step.
  kept = sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())
  assert kept == list(range(1, bad))[-3:]  # keep_checkpoints: the last 3


@pytest.mark.integration
def test_eval_and_merge_of_an_unfinished_run_say_so(tmp_path, capsys):
  run = tmp_path / "run"
  _fake_run(run)  # a c3a run (the digits default) stopped before it wrote its adapter
  for command in (["eval", str(run)], ["merge", str(run), str(tmp_path / "merged")]):
    assert cli.main(command) == 2
    assert "the run did not finish; continue it with c3a-jax train --resume" in (
      capsys.readouterr().err
    )


def test_resume_removes_what_a_killed_save_left_half_written(tmp_path):
  out = tmp_path / "run"
  exp = _fake_run(out)
  (out / ".adapter.k3j2x9").mkdir()  # save_adapter's new directory, killed before its rename
  (out / ".adapter.k3j2x9" / "adapter_model.safetensors").write_text("half")
  (out / ".summary.json.a8f1.tmp").write_text("{")  # atomic_write's temporary
  (out / ".my-notes").write_text("mine")
  with rundir.locked(str(out)):
    runner.prepare_dir(exp, resume=True, overwrite=False)
  names = sorted(os.listdir(out))
  assert ".adapter.k3j2x9" not in names and ".summary.json.a8f1.tmp" not in names
  assert (out / ".my-notes").read_text() == "mine" and (out / "summary.json").exists()


def test_summaries_and_metrics_are_strict_json():
  text = runner.strict_json({"eval_loss": float("nan"), "acc": 0.5, "x": {"y": float("inf")}})
  assert json.loads(text) == {"eval_loss": None, "acc": 0.5, "x": {"y": None}}
  assert "NaN" not in text and "Infinity" not in text


@pytest.mark.integration
def test_a_damaged_digits_cache_is_named_and_rebuilt(tmp_path, monkeypatch):
  from c3a_jax.cli import digits

  monkeypatch.setenv("C3A_JAX_CACHE", str(tmp_path))
  params = digits.pretrained_params(log=lambda _: None)  # trains and caches
  (cached,) = list(tmp_path.iterdir())
  cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a full disk or a kill
  logged = []
  again = digits.pretrained_params(log=logged.append)
  assert [m for m in logged if f"cached digits model {cached} is damaged" in m], logged
  assert np.array_equal(again["fc0"]["kernel"], params["fc0"]["kernel"])  # retrained the same
  # (A flipped bit: tests/test_cli.py::test_a_bit_flipped_digits_cache_is_rebuilt_with_a_warning)


@pytest.mark.integration
def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, capsys):
  """Flipped bytes on disk: --resume names the bad step and continues from the one before."""
  out = tmp_path / "run"
  args = [f"output_dir={out}", "train.mode=head", "train.save_every=10", "train.eval_every=1000"]
  assert cli.main(["train", "--quiet", "train.steps=20", *args]) == 0
  data_dir = out / "checkpoints" / "20" / "state" / "d"
  target = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)  # zeroed bytes: no longer what was saved
  target.write_bytes(bytes(data))
  with pytest.warns(UserWarning, match=r"checkpoints/20 is corrupt.*restoring an earlier"):
    assert cli.main(["train", "--quiet", "--resume", "train.steps=25", *args]) == 0
  assert json.load(open(out / "summary.json"))["steps"] == 25
  records = [json.loads(line) for line in open(out / "metrics.jsonl")]
  steps = [r["step"] for r in records if r["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 25  # none twice: 20 was logged again


def test_unmerge_refuses_another_adapter_and_params_never_merged():
  import jax
  import jax.numpy as jnp

  import c3a_jax as c3a

  params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}}
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"], init_weights="gaussian")
  adapted = c3a.attach(params, cfg, jax.random.key(1))
  other = c3a.split(c3a.attach(params, cfg, jax.random.key(2)))[0]
  adapter = c3a.split(adapted)[0]
  merged = c3a.merge(adapted)
  with pytest.raises(ValueError, match="'fc' was merged with another C3A kernel"):
    c3a.unmerge(merged, other)
  with pytest.raises(ValueError, match="kernel of layer 'fc' is not one c3a.merge returned"):
    c3a.unmerge(params, adapter)  # never merged
  np.testing.assert_allclose(c3a.unmerge(merged, adapter)["fc"]["kernel"], params["fc"]["kernel"])
  # Saved and loaded back, the record is gone: subtracting needs the caller's word.
  loaded = jax.tree.map(jnp.array, merged)
  with pytest.raises(ValueError, match=r"call unmerge\(\.\.\., check=False\)"):
    c3a.unmerge(loaded, adapter)
  restored = c3a.unmerge(loaded, adapter, check=False)
  np.testing.assert_allclose(restored["fc"]["kernel"], params["fc"]["kernel"], atol=1e-6)


@pytest.mark.parametrize("module", ["datasets", "transformers"])
def test_a_missing_hub_package_names_the_extra_to_install(module, monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError
  (tmp_path / "train.csv").write_text("text,label\ngood,1\n")
  argv = ["train", "task=seq_cls", f"data.name={tmp_path / 'train.csv'}", "model.name=roberta-base"]
  assert cli.main([*argv, f"output_dir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err
  assert f"needs '{module}', which is not installed" in err
  assert 'pip install "c3a-jax[cli]"' in err and "Traceback" not in err


def test_a_bad_metrics_line_is_named_and_a_cut_off_last_line_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  good = '{"step": 10, "split": "train", "loss": 0.5}\n'
  path.write_text(good + '{"step": 20, "spl\n')  # a crash mid-write
  assert [r["step"] for r in runner._Metrics.resume(str(path), 20).records] == [10]
  path.write_text(good + "garbage\n" + good)
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON .*delete that line"):
    runner._Metrics.resume(str(path), 20)
  path.write_text('{"loss": 1}\n' + good)
  with pytest.raises(ValueError, match=r"line 1 is not a metrics record"):
    runner._Metrics.resume(str(path), 20)


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt


def test_ctrl_c_at_startup_or_in_a_save_stops_with_one_line(tmp_path, monkeypatch, capsys):
  from c3a_jax.cli import commands
  from c3a_jax.training import Checkpointer

  monkeypatch.setattr(commands, "_job", _interrupt)  # while the model and data load
  assert cli.main(["train", "--quiet", f"output_dir={tmp_path / 'a'}"]) == 130
  err = capsys.readouterr().err
  assert "c3a-jax: interrupted" in err and "Traceback" not in err

  # A second Ctrl-C lands inside the checkpoint save (the first one asked for that save).
  monkeypatch.setattr(Checkpointer, "save", _interrupt)
  exp = _exp(tmp_path / "b", mode="full", steps=4, batch_size=2, save_every=2, eval_every=100)
  logs = []
  with pytest.raises(SystemExit) as stop:
    runner.run(exp, _toy_job([0, 1, 2, 1], [0, 2]), quiet=True, log=logs.append)
  assert stop.value.code == 130
  assert logs[-1].startswith("interrupted at step 2; a checkpoint cut short is never restored")


def test_a_key_committed_to_another_device_does_not_strand_the_kernels():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import c3a_jax as c3a
  from tests import backend

  devices = backend.cpu_devices(3)
  model = nn.Dense(8)
  params = jax.device_put(
    {"fc": model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]}, devices[2]
  )
  cfg = c3a.C3AConfig(block_size=4, target_modules=["fc"])
  adapted = c3a.attach(params, cfg, jax.device_put(jax.random.key(1), devices[1]))
  assert adapted["fc"]["c3a_kernel"].devices() != {devices[1]}
  apply = jax.jit(c3a.intercepted(lambda p, x: model.apply({"params": p["fc"]}, x)))
  assert apply(adapted, jnp.ones((2, 8))).devices() == {devices[2]}  # with the params


def test_unsafe_yaml_and_a_list_for_a_config_are_one_line(tmp_path, capsys):
  bad = ["train.lr=!!python/object/apply:os.system ['echo pwned']"]
  with pytest.raises(ValueError, match=r"override .train.lr=!!python/object.*is not a YAML value"):
    Experiment.from_dict({}, overrides=bad)  # safe_load: nothing is constructed or run
  (tmp_path / "config.yaml").write_text("- train\n- lr\n")
  assert cli.main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
  err = capsys.readouterr().err
  assert "config.yaml: the top level must be a mapping of sections, got list" in err
  assert "Traceback" not in err


# Issue 20: what a checkpoint or adapter may hold, and signals and saves that end in one line.


@pytest.mark.parametrize(
  "key,value", [("lr", "1e39"), ("weight_decay", "1e300"), ("head_lr", "3.5e38")]
)
def test_config_values_that_overflow_float32_are_refused(key, value):
  # Finite in Python, infinite in float32 (the training dtype): the non-finite check above
  # cannot see them.
  with pytest.raises(ValueError, match=rf"train\.{key}: .*overflows float32.*got '?{value}"):
    Experiment.from_dict({}, overrides=[f"train.{key}={value}"])
  Experiment.from_dict({}, overrides=[f"train.{key}=3e38"])  # the largest fit


def _linear_job(init=10.0):
  """Three classes from four ones: a finite loss and gradient whatever ``w`` holds."""
  x = np.ones((4, 4), np.float32)
  return Job(
    logits_fn=lambda p, b, rng, train: b["x"] @ p["w"],
    params={"w": np.full((4, 3), init, np.float32)},
    train_data={"x": x, "labels": np.asarray([0, 1, 2, 1])},
    eval_data=None,
  )


def _steps_kept(out):
  return sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())


def test_parameters_that_overflow_are_never_saved_or_called_good(tmp_path):
  """lr and weight decay within float32, their product not: the warmup's first step leaves the
  params as they are (lr 0), its second overflows them while its loss and gradient (computed
  before the update) are finite."""
  out = tmp_path / "run"
  train = dict(mode="full", batch_size=2, steps=3, save_every=1, eval_every=100, lr=1e38)
  exp = _exp(out, **train, weight_decay=1.0, warmup_steps=2)
  with pytest.raises(runner.NonFiniteError) as error:
    runner.run(exp, _linear_job(), quiet=True, log=lambda _: None)
  assert "non-finite at step 2" in str(error.value)
  assert "the checkpoint of step 1 is the last good state" in str(error.value)
  assert _steps_kept(out) == [1] and not (out / "params.msgpack").exists()
  # Overflowing at the last step: nothing is written.
  exp = _exp(tmp_path / "last", **{**train, "steps": 1}, weight_decay=100.0)
  with pytest.raises(runner.NonFiniteError, match=r"non-finite at step 1 .*none was saved"):
    runner.run(exp, _linear_job(), quiet=True, log=lambda _: None)
  assert _steps_kept(tmp_path / "last") == []
  assert not (tmp_path / "last" / "params.msgpack").exists()


def _orbax_tracebacks(caplog) -> list[str]:
  """Log records with a traceback (orbax logs each error before raising it)."""
  return [r.getMessage()[:200] for r in caplog.records if r.exc_info or r.levelno >= 40]


def test_a_checkpoints_path_that_is_a_file_is_one_line(tmp_path, caplog):
  out = tmp_path / "run"
  exp = _exp(out, mode="full", batch_size=2, steps=2, eval_every=100)
  runner.run(exp, _linear_job(0.0), quiet=True, log=lambda _: None)
  shutil.rmtree(out / "checkpoints")
  (out / "checkpoints").write_text("mine")
  with pytest.raises(OSError, match=rf"{out / 'checkpoints'} is a file, not a directory"):
    runner.run(exp, _linear_job(0.0), resume=True, quiet=True, log=lambda _: None)
  assert (out / "checkpoints").read_text() == "mine"
  assert _orbax_tracebacks(caplog) == []


def test_a_full_disk_mid_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, caplog):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  async def full_disk(self, x, directory):  # the async write of a checkpoint's metadata
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  out = tmp_path / "run"
  exp = _exp(out, mode="full", batch_size=2, steps=4, save_every=2, eval_every=100)
  with pytest.raises(OSError, match=r"checkpoint .*/checkpoints/2 was not written: .*No space"):
    runner.run(exp, _linear_job(0.0), quiet=True, log=lambda _: None)
  assert _orbax_tracebacks(caplog) == []


def test_a_second_sigterm_inside_an_async_save_is_one_line(tmp_path, monkeypatch, caplog):
  """The scheduler's SIGTERM arrives while a checkpoint is written in the background, and a
  second one while the loop waits for that write: status 130, one line, nothing else."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  write = json_checkpoint_handler.JsonCheckpointHandler._save_fn
  pid, sent = os.getpid(), []

  async def slow_write(self, x, directory):
    if not sent:  # the first save only
      sent.append(True)
      os.kill(pid, signal.SIGTERM)  # the loop stops after this step and saves again...
      time.sleep(0.5)
      os.kill(pid, signal.SIGTERM)  # ...waiting for this write, when the second one comes
      time.sleep(0.5)
    await write(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", slow_write)
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  exp = _exp(tmp_path / "run", mode="full", batch_size=2, steps=10**6, save_every=2)
  logs = []
  with pytest.raises(SystemExit) as stop:
    runner.run(exp, _linear_job(0.0), quiet=True, log=logs.append)
  assert stop.value.code == 130
  assert logs[-1].startswith("interrupted at step") and len(logs) == 1, logs
  assert _orbax_tracebacks(caplog) == [] and unraisable == []


def _swallowed(signum):
  """Runs the handler of ``signum`` as a signal arriving inside a gc callback (JAX's
  ``_xla_gc_callback``) would: what it raises is printed as unraisable and dropped."""

  def callback(phase, info):
    if phase == "start":
      gc.callbacks.remove(callback)
      handler = signal.getsignal(signum)
      handler(signum, None)

  gc.callbacks.append(callback)
  gc.collect()


def test_ctrl_c_swallowed_by_a_gc_callback_still_stops_the_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sys, "unraisablehook", lambda _: None)
  plot = runner._plot

  def plot_then_ctrl_c(*args, **kwargs):  # Ctrl-C while the run writes what it leaves
    _swallowed(signal.SIGINT)
    return plot(*args, **kwargs)

  monkeypatch.setattr(runner, "_plot", plot_then_ctrl_c)
  exp = _exp(tmp_path / "run", mode="full", batch_size=2, steps=2, eval_every=100)
  logs = []
  with pytest.raises(SystemExit) as stop:
    runner.run(exp, _linear_job(0.0), quiet=True, log=logs.append)
  said = [*logs, *capsys.readouterr().err.splitlines()]
  assert stop.value.code == 130 and "stopped by SIGINT at step 2: the run is complete" in said[-1]
  assert (tmp_path / "run" / "summary.json").is_file()  # written whole first
  # Anywhere else in a command (between the runs of the digits default, say): status 130 too.
  from c3a_jax.cli import commands

  monkeypatch.setattr(commands, "main", lambda argv: _swallowed(signal.SIGINT) or 0)
  assert cli.main(["train"]) == 130


def test_an_ignored_sigint_stays_ignored(monkeypatch):
  # `nohup c3a-jax train &` or a scheduler's launcher: the user chose that Ctrl-C is not for it.
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with runner._stop_signal():
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    from c3a_jax.cli import commands

    seen = []
    monkeypatch.setattr(commands, "main", lambda argv: seen.append(signal.getsignal(2)) or 0)
    assert cli.main(["train"]) == 0 and seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def _c3a_job():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  model = nn.Dense(3)
  job = _linear_job(0.0)
  job.logits_fn = lambda p, b, rng, train: model.apply({"params": p["fc"]}, b["x"])
  job.params = {"fc": model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]}
  return job


def test_a_linked_adapter_directory_is_refused_not_written_through(tmp_path):
  out = tmp_path / "run"
  config = {"block_size": 1, "target_modules": ["fc"]}
  exp = Experiment.from_dict(
    {"output_dir": str(out), "c3a": config, "train": {"steps": 2, "batch_size": 2}}
  )
  runner.run(exp, _c3a_job(), quiet=True, log=lambda _: None)
  mine = tmp_path / "my-adapter"
  shutil.move(out / "adapter", mine)
  (out / "adapter").symlink_to(mine)
  before = {p.name: p.read_bytes() for p in mine.iterdir()}
  exp = exp.model_copy(update={"train": exp.train.model_copy(update={"steps": 4})})
  with pytest.raises(rundir.RunDirError, match=rf"{out / 'adapter'} is a symbolic link"):
    runner.run(exp, _c3a_job(), resume=True, quiet=True, log=lambda _: None)
  assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


@pytest.mark.integration
def test_resume_refuses_a_checkpoint_whose_data_position_changed(tmp_path, capsys):
  """One bit of the metadata (data_position 20 -> 21) resumed "at step 20" elsewhere in the
  data, exit 0, another adapter: now it is corrupt, set aside, and the run resumes at 10."""
  out = tmp_path / "run"
  args = [f"output_dir={out}", "train.mode=head", "train.save_every=10", "train.eval_every=1000"]
  assert cli.main(["train", "--quiet", "train.steps=20", *args]) == 0
  meta = out / "checkpoints" / "20" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes().replace(b'"data_position": 20', b'"data_position": 21'))
  with pytest.warns(UserWarning, match=r"checkpoints/20 is corrupt: its metadata differs"):
    assert cli.main(["train", "--quiet", "--resume", "train.steps=25", *args]) == 0
  assert "resumed" in capsys.readouterr().err and (out / "checkpoints" / "20.corrupt").is_dir()
  assert json.load(open(out / "summary.json"))["steps"] == 25


@pytest.mark.integration
def test_two_quick_sigterms_end_in_one_line(tmp_path):
  """The second SIGTERM lands inside a save (one every step) or just after the first: the
  process ends with one line, whichever, never orbax's or asyncio's tracebacks."""
  out = tmp_path / "run"
  args = ["train.steps=1000000", "train.save_every=1", "train.eval_every=1000000"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "c3a_jax", "train", "--quiet", f"output_dir={out}", *args],
    cwd=ROOT,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  checkpoints, deadline = out / "checkpoints", time.time() + 120
  while time.time() < deadline and not (checkpoints.is_dir() and len(os.listdir(checkpoints)) > 2):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  # Leaving out absl's info lines, and the digits model's pretraining where not cached yet.
  lines = [x for x in err.splitlines() if not re.match(r"[IW]\d{4} |pretraining the digits", x)]
  assert proc.returncode in (130, 143), err[-3000:]
  assert len(lines) == 1 and re.match(r"(interrupted|stopped by SIGTERM) at step", lines[0]), err
