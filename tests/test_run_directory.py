"""The run directory under attack (issue 20): a lock file that is a link or not ours, a second
process's --overwrite while the baselines train, a kill at each write, --resume asked to go back,
a typo in target_modules, and what is refused before the model loads. (The rules are in
c3a_jax/cli/rundir.py and runner.py; the README's Reliability section lists the guarantees.)"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from c3a_jax import cli
from c3a_jax.cli import commands, digits, rundir, runner
from c3a_jax.cli.experiment import Experiment
from tests.run_dirs import ROOT, cache  # noqa: F401 (cache: an autouse fixture)
from tests.run_dirs import exp as _exp
from tests.run_dirs import fake_run as _fake_run

SHORT = ["train.steps=5", "train.eval_every=5", "train.save_every=5", "train.log_every=5"]


def _no_model(monkeypatch):
  """Loading the model fails the test: what can be checked before it must be."""

  def load(exp):
    raise AssertionError("the model loaded before the check")

  monkeypatch.setattr(commands, "_job", load)


def _untrained_digits(monkeypatch):
  """The digits job without its pretraining (seconds): enough for what is refused first."""
  import jax
  import jax.numpy as jnp

  init = digits.DigitsMLP().init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  monkeypatch.setattr(digits, "pretrained_params", lambda log=print: init)


# 1. The lock file.


def test_a_linked_lock_file_is_refused_and_its_target_kept(tmp_path, monkeypatch, capsys):
  out = tmp_path / "run"
  out.mkdir()
  important = tmp_path / "important.txt"
  important.write_text("mine\n")
  (out / rundir.LOCK).symlink_to(important)
  _no_model(monkeypatch)
  assert cli.main(["train", "--quiet", f"output_dir={out}"]) == 2
  err = capsys.readouterr().err
  assert f"{out / rundir.LOCK} is a symbolic link" in err and len(err.splitlines()) == 1
  with pytest.raises(rundir.RunDirError, match=r"is a symbolic link; c3a-jax does not follow"):
    with rundir.locked(str(out)):
      pass
  assert important.read_text() == "mine\n"
  # A dangling link: following it would create the file it names.
  (out / rundir.LOCK).unlink()
  (out / rundir.LOCK).symlink_to(tmp_path / "created.txt")
  with pytest.raises(rundir.RunDirError, match=r"is a symbolic link"):
    with rundir.locked(str(out)):
      pass
  assert not (tmp_path / "created.txt").exists()


def test_a_lock_file_that_is_not_ours_is_never_truncated(tmp_path):
  out = tmp_path / "run"
  out.mkdir()
  lock = out / rundir.LOCK
  lock.write_text("my notes\n")  # a file of the user's at c3a-jax's name
  with pytest.raises(rundir.RunDirError, match=r"is not c3a-jax's lock file .*nothing was written"):
    with rundir.locked(str(out)):
      pass
  assert lock.read_text() == "my notes\n"
  lock.unlink()
  other = tmp_path / "other.txt"
  other.write_text("12\n")
  os.link(other, lock)  # a hard link: truncating it truncates other.txt
  with pytest.raises(rundir.RunDirError, match=r"is not c3a-jax's lock file"):
    with rundir.locked(str(out)):
      pass
  assert other.read_text() == "12\n"
  lock.unlink()
  os.mkfifo(lock)
  with pytest.raises(rundir.RunDirError, match=r"is not c3a-jax's lock file"):
    with rundir.locked(str(out)):
      pass
  lock.unlink()
  lock.write_text("4242\n")  # the lock of an earlier run: reused
  with rundir.locked(str(out)):
    assert lock.read_text() == f"{os.getpid()}\n"


# 2. The lock covers the whole run; --overwrite checks everything before deleting.


def test_overwrite_checks_the_locks_of_the_runs_inside_before_deleting(tmp_path):
  out = tmp_path / "run"
  exp = _fake_run(out)
  baseline = out / "baselines" / "head"
  with rundir.locked(str(baseline)), rundir.locked(str(out)):  # a baseline still training
    with pytest.raises(
      rundir.RunDirError,
      match=rf"{baseline} is in use by another c3a-jax process \(pid {os.getpid()}\).*nothing",
    ):
      runner.prepare_dir(exp, resume=False, overwrite=True)
  assert (out / "summary.json").exists() and (out / "checkpoints" / "10" / "state").exists()
  assert (out / "config.yaml").exists() and baseline.is_dir()


@pytest.mark.integration
def test_overwrite_from_a_second_process_is_refused_while_the_baselines_train(
  tmp_path, monkeypatch, capsys
):
  out = tmp_path / "run"
  args = [f"output_dir={out}", *SHORT]
  real_run, started, second = runner.run, [], []

  def run(exp, job, **kwargs):
    if exp.output_dir.endswith(os.path.join("baselines", "head")) and not started:
      started.append(exp.output_dir)
      # In-process as a second process would: flock locks belong to each open of the file.
      second.append(cli.main(["train", "--quiet", "--overwrite", *args]))
    return real_run(exp, job, **kwargs)

  monkeypatch.setattr(runner, "run", run)
  assert cli.main(["train", "--quiet", *args]) == 0
  assert second == [2]
  err = capsys.readouterr().err
  assert f"{out} is in use by another c3a-jax process (pid {os.getpid()})" in err
  for name in ["config.yaml", "checkpoints/5", "adapter", "summary.json"]:
    for run_dir in ["", "baselines/head/", "baselines/full/"]:
      if name != "adapter" or not run_dir:
        assert (out / f"{run_dir}{name}").exists(), run_dir + name


# 9. --resume never goes back, and does not retrain finished baselines.


def test_resume_with_fewer_steps_than_done_is_refused(tmp_path):
  out = tmp_path / "run"
  _fake_run(out)
  with pytest.raises(
    rundir.RunDirError, match=r"the run in .* has done 10 steps; train.steps=5 is fewer"
  ):
    with rundir.locked(str(out)):
      runner.prepare_dir(_exp(out, steps=5), resume=True, overwrite=False)
  assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 1000  # untouched
  with rundir.locked(str(out)):
    runner.prepare_dir(_exp(out, steps=10), resume=True, overwrite=False)  # as many: fine


@pytest.mark.integration
def test_resume_of_a_finished_run_retrains_nothing(tmp_path, monkeypatch):
  out = tmp_path / "run"
  args = [f"output_dir={out}", *SHORT]
  assert cli.main(["train", "--quiet", *args]) == 0
  before = {
    name: (out / name).read_bytes()
    for name in ["summary.json", "baselines/head/summary.json", "baselines/full/params.msgpack"]
  }
  traced = []
  real = runner.make_train_step

  def counting(*a, **kw):
    step = real(*a, **kw)

    def traced_step(*inputs):
      traced.append(1)  # runs when jit traces: once for each run that takes a step
      return step(*inputs)

    return traced_step

  monkeypatch.setattr(runner, "make_train_step", counting)
  assert cli.main(["train", "--quiet", "--resume", *args]) == 0
  assert traced == []
  assert {name: (out / name).read_bytes() for name in before} == before


# 10. A kill at any write leaves a directory --resume or --overwrite recovers.


def test_a_kill_inside_mark_leaves_a_directory_train_and_overwrite_recover(tmp_path):
  out = tmp_path / "run"
  for resume, overwrite in [(False, False), (False, True)]:
    out.mkdir()
    (out / rundir.LOCK).write_text("12345\n")
    (out / f".{rundir.MARKER}.x8k2qz.tmp").write_text('{"c3a_jax": "0.2", "entr')
    with rundir.locked(str(out)):
      runner.prepare_dir(_exp(out), resume=resume, overwrite=overwrite)
    assert sorted(os.listdir(out)) == sorted([rundir.LOCK, rundir.MARKER, "config.yaml"])
    for name in os.listdir(out):
      os.remove(out / name)
    out.rmdir()
  # Killed as --resume marked the run again: the old marker stands, the temporary goes.
  exp = _fake_run(out)
  (out / f".{rundir.MARKER}.a1b2c3.tmp").write_text("{")
  with rundir.locked(str(out)):
    runner.prepare_dir(exp, resume=True, overwrite=False)
  assert not any(name.endswith(".tmp") for name in os.listdir(out))


# Runs `c3a-jax train ARGS...`, dying as kill -9 would (the temporary left behind) just before
# the NTH rename onto a file named TARGET.
_KILL_AT = """
import os, sys
from c3a_jax import cli
target, nth = sys.argv[1], int(sys.argv[2])
real, seen = os.replace, []
def replace(src, dst, **kwargs):
  if str(dst).endswith(target):
    seen.append(dst)
    if len(seen) == nth:
      os._exit(137)
  real(src, dst, **kwargs)
os.replace = replace
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
  "nth,recover",
  [(1, "--overwrite"), (2, "--resume")],
  ids=["the-run's-marker", "a-baseline's-marker"],
)
def test_a_kill_inside_mark_is_recovered(tmp_path, nth, recover):
  out = tmp_path / "run"
  args = ["train", "--quiet", f"output_dir={out}", *SHORT]
  proc = subprocess.run(
    [sys.executable, "-c", _KILL_AT, rundir.MARKER, str(nth), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 137, proc.stderr[-2000:]
  assert any(name.startswith(f".{rundir.MARKER}.") for name in os.listdir(out)) or nth > 1
  assert cli.main([*args, recover]) == 0
  for run_dir in [out, out / "baselines" / "head", out / "baselines" / "full"]:
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5
    assert not any(name.endswith(".tmp") for name in os.listdir(run_dir))


# 8. A target_modules entry that matches no layer.


def test_a_target_modules_entry_that_matches_no_layer_is_named(tmp_path, monkeypatch, capsys):
  _untrained_digits(monkeypatch)
  out = tmp_path / "run"
  assert cli.main(["train", "--quiet", f"output_dir={out}", "c3a.target_modules=[fc0, fcl]"]) == 2
  err = capsys.readouterr().err
  assert "error: c3a.target_modules entry 'fcl' matches no module" in err, err
  assert "'fc1'" in err and "the model's layers: fc0, fc1, head" in err
  assert len(err.splitlines()) == 1
  assert not out.exists()  # refused before the run directory


# 15. output_dir follows the task and the model.


def test_output_dir_defaults_from_the_task_and_the_model():
  lm = ["task=causal_lm", "model.name=Qwen/Qwen3-0.6B", "data.name=alpaca.json"]
  default = commands.DIGITS_DEFAULT
  expected = os.path.join("runs", "causal_lm-Qwen3-0.6B")
  assert Experiment.from_dict(default, lm).output_dir == expected
  local = {"task": "seq_cls", "model": {"name": "/models/bert-tiny/"}, "data": {"name": "d.csv"}}
  assert Experiment.from_dict(local).output_dir == os.path.join("runs", "seq_cls-bert-tiny")
  assert Experiment.from_dict(default).output_dir == "runs/c3a-digits"  # the README's
  assert Experiment.from_dict(default, ["output_dir=mine"]).output_dir == "mine"


# 16. What can be refused is refused before the model loads.


def test_the_run_directory_and_data_files_are_checked_before_the_model_loads(
  tmp_path, monkeypatch, capsys
):
  _no_model(monkeypatch)
  out = tmp_path / "run"
  _fake_run(out)
  cases = [
    ([f"output_dir={out}"], "holds another run; pass --resume"),
    (["--resume", f"output_dir={tmp_path / 'none'}"], "holds no run (no config.yaml)"),
  ]
  hub = ["task=seq_cls", "model.name=roberta-base", f"output_dir={tmp_path / 'new'}"]
  missing = tmp_path / "missing.csv"
  cases += [
    ([*hub, f"data.name={missing}"], f"data file {missing} does not exist"),
    (
      ["task=causal_lm", "model.library=tunix", *hub[1:], f"data.name={missing}"],
      f"data file {missing} does not exist",
    ),
  ]
  cases += [
    (
      ["task=causal_lm", "model.library=tunix", *hub[1:], f"data.name={tmp_path / 'saved'}"],
      f"data.name '{tmp_path / 'saved'}' does not exist",
    )
  ]
  (tmp_path / "train.csv").write_text("text,label\ngood,1\n")
  eval_split = f"data.eval_split={tmp_path / 'eval.csv'}"
  cases += [([*hub, f"data.name={tmp_path / 'train.csv'}", eval_split], "is not a file")]
  for argv, message in cases:
    assert cli.main(["train", "--quiet", *argv]) == 2, argv
    assert message in capsys.readouterr().err, argv
  with rundir.locked(str(out)):
    assert cli.main(["train", "--quiet", "--overwrite", f"output_dir={out}"]) == 2
  assert "in use by another c3a-jax process" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()
