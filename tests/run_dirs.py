"""What the tests of the command's run directories share: a private cache, a config, a run
directory as the runner leaves it."""

import os

import pytest

from c3a_jax.cli import rundir, runner
from c3a_jax.cli.experiment import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
  """The digits model's cache under the session's temporary directory, never the user's."""
  monkeypatch.setenv("C3A_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "c3a-cache"))


def exp(out, **train):
  return Experiment.from_dict({"output_dir": str(out), "train": train})


def fake_run(out):
  """A run directory as the runner leaves it (newest checkpoint: step 10), without training."""
  config = exp(out)
  with rundir.locked(str(out)):
    runner.prepare_dir(config, resume=False, overwrite=False)
  (out / "checkpoints" / "10").mkdir(parents=True)
  (out / "checkpoints" / "10" / "state").write_text("weights")
  (out / "summary.json").write_text("{}")
  return config
