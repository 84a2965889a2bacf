"""The CLI's training loop: a Job and an Experiment in, a run directory out.

The run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per log or eval), ``metrics.png`` (loss and accuracy), ``checkpoints/`` (orbax, for
``--resume``), ``summary.json`` and, for C3A runs, ``adapter/`` in PEFT's format (head-only and
full runs write ``params.msgpack`` instead). Ctrl-C or SIGTERM saves a checkpoint and exits
(status 130 or 143); ``--resume`` continues exactly. The directory's rules: :mod:`rundir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import c3a_jax as c3a
from c3a_jax import _compat
from c3a_jax.cli import rundir
from c3a_jax.cli.experiment import Experiment, TrainSpec
from c3a_jax.cli.job import (
  Job,
  Log,
  batches,
  eval_batches,
  quantize_rule,
  quantized_paths,
)
from c3a_jax.cli.rundir import RunDirError
from c3a_jax.io import atomic_write
from c3a_jax.training import Checkpointer, TrainState, cast_frozen, make_train_step

# The shell's exit status for a process stopped by a signal: 128 + its number.
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
RESUMABLE = {
  ("train", k)
  for k in ("steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "strategy")
}


def _check_dir(exp: Experiment, *, resume: bool, overwrite: bool) -> None:
  """Whether ``exp.output_dir`` may take this run; a RunDirError says why not. Reads only."""
  out = exp.output_dir
  config_path = os.path.join(out, "config.yaml")
  if resume:
    if not os.path.isfile(config_path):
      raise RunDirError(
        f"--resume: {out} holds no run (no config.yaml); start one without --resume"
      )
    with open(config_path) as f:
      saved = _compat.upgrade_experiment(yaml.safe_load(f), config_path)
    now = exp.to_dict()
    # A resumed run may go on for more steps and log, evaluate or save at other intervals;
    # nothing that changes the training itself may differ.
    diff = [
      f"{section}.{k}"
      for section in now
      if isinstance(now[section], dict)
      for k in set(now[section]) | set(saved.get(section) or {})
      if (section, k) not in RESUMABLE and now[section].get(k) != (saved.get(section) or {}).get(k)
    ]
    diff += [
      k
      for k in now
      if not isinstance(now[k], dict) and k != "output_dir" and now[k] != saved.get(k)
    ]
    if diff:
      raise RunDirError(
        f"--resume: the config differs from the run in {out} at {', '.join(sorted(diff))}"
      )
    _check_steps(out, exp.train.steps)
  elif rundir.user_entries(out):
    if not rundir.is_run(out):
      hint = (
        " (a run of c3a-jax 0.1, from before the marker, becomes one when resumed once)"
        if os.path.isfile(config_path)
        else ""
      )
      raise RunDirError(
        f"{out} is not empty and holds no c3a-jax run (no {rundir.MARKER}){hint}; "
        "choose another output_dir"
      )
    if not overwrite:
      raise RunDirError(
        f"{out} holds another run; pass --resume to continue it or --overwrite to replace it"
      )


def _check_steps(out: str, steps: int) -> None:
  """--resume never goes back: a run that has done more steps than ``train.steps`` would keep
  its later adapter and summary under a config.yaml that says fewer."""
  done = _steps_done(out)
  if done > steps:
    raise RunDirError(
      f"--resume: the run in {out} has done {done} steps; train.steps={steps} is fewer (a run "
      f"is not undone: pass train.steps={done} or more, or --overwrite to start again)"
    )


def _steps_done(out: str) -> int:
  """The newest checkpoint's step, 0 without one (orbax names each step's directory by it)."""
  folder = os.path.join(out, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return max((int(n) for n in names if n.isascii() and n.isdigit()), default=0)


def check(exp: Experiment, *, resume: bool, overwrite: bool) -> None:
  """What :func:`run` would refuse about ``exp.output_dir`` (its lock, another run, a --resume
  that differs or goes back), refused before the model loads, which may take minutes. Reads
  only; :func:`run` checks again under the lock."""
  rundir.check_free(exp.output_dir)
  _check_dir(exp, resume=resume, overwrite=overwrite)


def strict_json(record: dict, **kwargs: Any) -> str:
  """``record`` as strict JSON: a non-finite number (which ``json`` writes as a bare NaN that
  strict readers refuse) is written as null."""

  def finite(v: Any) -> Any:
    if isinstance(v, dict):
      return {k: finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v

  return json.dumps(finite(record), allow_nan=False, **kwargs)


def prepare_dir(exp: Experiment, *, resume: bool, overwrite: bool) -> str:
  """Readies ``exp.output_dir`` for the run, whose lock the caller holds: checks it, clears
  it for ``--overwrite`` (only what the marker lists), marks it, writes ``config.yaml``.
  Returns the directory."""
  out = exp.output_dir
  _check_dir(exp, resume=resume, overwrite=overwrite)
  if not resume and rundir.user_entries(out):
    rundir.clear(out)
  os.makedirs(out, exist_ok=True)
  rundir.clean_temporaries(out)  # half-written files of a killed run
  rundir.mark(out)  # before anything else is written
  atomic_write(
    os.path.join(out, "config.yaml"), yaml.safe_dump(exp.to_dict(), sort_keys=False).encode()
  )
  return out


def adapter_config(exp: Experiment) -> c3a.C3AConfig:
  """The C3A config as the run's adapter files record it: PEFT's ``base_model_name_or_path``
  is ``model.name`` (PEFT's ``from_pretrained`` of the adapter alone finds the base by it)."""
  if exp.c3a.base_model_name_or_path or not exp.model.name or exp.task == "digits":
    return exp.c3a
  return dataclasses.replace(exp.c3a, base_model_name_or_path=exp.model.name)


def _schedule(lr: float, warmup: int) -> optax.Schedule:
  return optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)


def _setup(exp: Experiment, job: Job):
  """(trainable, base, tx, params) for the run's mode; ``params`` is the tree it adapts."""
  cfg, t = exp.c3a, exp.train
  adamw = lambda lr: optax.adamw(_schedule(lr, t.warmup_steps), weight_decay=t.weight_decay)
  head_lr = t.head_lr if t.head_lr is not None else t.lr
  if t.mode == "full":
    return job.params, None, adamw(head_lr), job.params
  params = job.params
  if t.mode == "c3a" and job.attach is not None:
    params = job.attach(params, cfg, jax.random.key(t.seed))
  elif t.mode == "c3a":
    params = c3a.attach(params, cfg, jax.random.key(t.seed), model_type=job.model_type)
  trainable, base = c3a.split(params, cfg)
  _refuse_training_quantized(exp, trainable)
  if not jax.tree.leaves(trainable):
    raise ValueError(
      f"train.mode={t.mode!r} trains nothing: set c3a.modules_to_save "
      "(e.g. [classifier]) or c3a.bias"
    )
  return trainable, base, c3a.optimizer(adamw(t.lr), trainable, cfg, head_tx=adamw(head_lr)), params


def _refuse_training_quantized(exp: Experiment, trainable: Any) -> None:
  """A weight Qwix quantized does not train (its values are integers, or 8-bit floats): one
  that the run would train (c3a.modules_to_save's, in a module_path that names them) is refused."""
  paths, q = quantized_paths(trainable), exp.model.quantize
  if paths and q is not None:
    raise ValueError(
      f"model.quantize.module_path {quantize_rule(exp)!r} quantizes "
      f"{', '.join(paths[:3])}, which train.mode {exp.train.mode} trains (c3a.modules_to_save); "
      f"a weight stored in {q.weights} does not train: leave it out of module_path (null "
      "leaves out every module c3a.modules_to_save names)"
    )


@contextlib.contextmanager
def _typos_refused(params: Any) -> Iterator[None]:
  """The library warns of a ``target_modules`` (or ``exclude_modules``) list entry that names no
  module: a typo, with which a run would train the other entries' layers alone and exit 0. A
  run refuses it, naming the model's layers."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", c3a.UnmatchedTargetWarning)
    try:
      yield
    except c3a.UnmatchedTargetWarning as w:
      raise ValueError(f"c3a.{w}; the model's layers: {_layer_names(params)}") from None


def _layer_names(params: Any, limit: int = 16) -> str:
  """The distinct last names of the linear layers (a ``kernel``) in ``params``, in tree order."""
  names = dict.fromkeys(_linear_names(params))
  shown = ", ".join(list(names)[:limit])
  return shown + (" ..." if len(names) > limit else "")


def _linear_names(tree: Any) -> Iterator[str]:
  """The name of every module in ``tree`` that holds a ``kernel``, parents before children."""
  for name, node in tree.items():
    if isinstance(node, Mapping):
      if "kernel" in node:
        yield str(name)
      yield from _linear_names(node)


# How the console, plots and tables name each train.mode.
MODE_NAMES = {"c3a": "C3A", "head": "head only", "full": "full fine-tuning"}


def run_name(exp: Experiment) -> str:
  """How plots name a run: its mode's name, and the base's storage where model.quantize set it
  (``C3A over int8 (tile 32)``)."""
  name, spec = MODE_NAMES[exp.train.mode], exp.model.quantize
  return name if spec is None else f"{name} over {spec.label()}"


def _figure():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt.subplots(1, 2, figsize=(9, 3.8))


def _save(fig, path: str, title: str) -> None:
  """Titles ``fig`` (which run, which mode: plots of several runs look alike) and writes it."""
  import matplotlib.pyplot as plt

  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def _plot(records: list[dict], path: str, title: str) -> None:
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  fig, (ax1, ax2) = _figure()
  ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  ax1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
  ax1.set(xlabel="step", ylabel="loss", title="loss")
  ax1.legend()
  ax2.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
  ax2.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="eval")
  ax2.set(xlabel="step", ylabel="accuracy", title="accuracy")
  ax2.legend()
  _save(fig, path, title)


def plot_comparison(runs: dict[str, str], path: str, title: str) -> None:
  """Runs side by side (label -> run directory): training loss, and eval accuracy (training
  accuracy where no run has an eval split)."""
  fig, (ax1, ax2) = _figure()
  runs = {label: _read_metrics(os.path.join(out, "metrics.jsonl")) for label, out in runs.items()}
  for label, records in runs.items():
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"] or train
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
    ax2.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label=label)
  which = "eval" if any(r["split"] == "eval" for rs in runs.values() for r in rs) else "train"
  ax1.set(xlabel="step", ylabel="loss", title="training loss")
  ax2.set(xlabel="step", ylabel="accuracy", title=f"{which} accuracy")
  ax1.legend()
  ax2.legend()
  _save(fig, path, title)


def _read_metrics(path: str) -> list[dict]:
  """The records of ``metrics.jsonl``; a ValueError naming the file and line of a bad one.
  Only a cut-off last line (a crash mid-write) is dropped."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        continue
      raise ValueError(
        f"{path}: line {i + 1} is not JSON ({e.msg}); restore or delete that line to resume"
      ) from None
    if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
      raise ValueError(
        f"{path}: line {i + 1} is not a metrics record (a JSON object with an integer "
        '"step"); restore or delete that line to resume'
      )
    records.append(record)
  return records


def evaluate(job: Job, params: Any, batch_size: int) -> dict[str, float]:
  """Loss and accuracy over ``job.eval_data`` (adapted params, under the interceptor): means
  over examples (over scored tokens for a causal LM)."""
  return _scored(job, params, batch_size, adapters=None)[0]


def evaluate_mixed(job: Job, params: Any, adapters: int, batch_size: int) -> list[dict]:
  """:func:`evaluate` for each adapter of a set (``c3a.stack_adapters``) at once: every eval
  batch repeated once per adapter, copy ``k`` through adapter ``k``, in one mixed batch of
  about ``batch_size`` rows."""
  return _scored(job, params, batch_size, adapters)


def _scored(job: Job, params: Any, batch_size: int, adapters: int | None) -> list[dict]:
  """Per adapter (one without ``adapters``): loss and accuracy summed over rows, then means."""
  k = adapters or 1
  totals = np.zeros((k, 3))
  for batch in eval_batches(job.eval_data, max(1, batch_size // k)):
    index = np.repeat(np.arange(k), len(next(iter(batch.values()))))
    if adapters is not None:
      batch = {name: np.concatenate([v] * k) for name, v in batch.items()}
    values = job.eval_stats(params, batch, None if adapters is None else index)
    for i, value in enumerate(values):
      totals[:, i] += np.bincount(index, np.asarray(value, np.float64), minlength=k)
  counts = np.maximum(totals[:, 2], 1.0)
  return [
    {"loss": loss / n, "accuracy": acc / n}
    for (loss, acc, _), n in zip(totals, counts, strict=True)
  ]


@contextlib.contextmanager
def _stop_signal() -> Iterator[list[int]]:
  """Ctrl-C (SIGINT) or a scheduler's SIGTERM (SLURM, Kubernetes, TPU VM preemption) is
  recorded in the list this yields, which the loop checks between steps: a step is never cut
  in half, so its donated state is never lost. A second signal also raises KeyboardInterrupt,
  to stop at once; should that be dropped (raised inside a gc callback, such as JAX's
  ``_xla_gc_callback``), the record still stops the run. A signal the process was started
  ignoring (``nohup``, ``&`` in a script) stays ignored."""
  received: list[int] = []

  def handler(signum, frame):
    received.append(signum)
    if len(received) > 1:
      raise KeyboardInterrupt

  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {
    s: signal.signal(s, handler)
    for s in (signal.SIGINT, signal.SIGTERM)
    if signal.getsignal(s) is not signal.SIG_IGN
  }
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, signal.SIG_DFL if h is None else h)  # None: set outside Python


def _check_fits(exp: Experiment, job: Job) -> None:
  """Errors a run would hit at its first step, raised before the run directory is touched."""
  t = exp.train
  if job.num_train < t.batch_size:
    raise ValueError(
      f"train.batch_size={t.batch_size} is larger than the {job.num_train} "
      "training examples (see data.max_train_examples)"
    )
  if job.eval_data is not None and not len(next(iter(job.eval_data.values()))):
    raise ValueError("the eval split is empty; set data.eval_split to null to train without one")
  # Out-of-range labels or token ids are not errors inside jit: JAX clamps or wraps the index.
  key, what = ("labels", "label") if job.kind == "classify" else ("input_ids", "token id")
  n = job.num_outputs
  for split, data in (("train", job.train_data), ("eval", job.eval_data)):
    values = None if data is None else np.asarray(data[key])
    bad = None if values is None else (values < 0) | (values >= n)
    if bad is not None and bad.any():
      i = int(np.argmax(bad.ravel()))
      raise ValueError(
        f"{split} example {i // max(1, values[0].size)} has {what} {values.ravel()[i]}, but the "
        f"model has {n} outputs (valid: 0 to {n - 1}); check data.num_labels and the data"
      )


@dataclasses.dataclass
class _Metrics:
  """``metrics.jsonl``, and its records in memory for the plot."""

  path: str
  records: list[dict]

  @classmethod
  def resume(cls, path: str, step: int) -> _Metrics:
    """The records up to ``step`` (a resumed run drops what came after its checkpoint)."""
    records = [r for r in _read_metrics(path) if r["step"] <= step]
    atomic_write(path, "".join(strict_json(r) + "\n" for r in records).encode())
    return cls(path, records)

  def write(self, record: dict) -> None:
    # One line appended per record (not the whole file rewritten): a crash loses at most a
    # partial last line, which resume drops along with everything past the checkpoint.
    self.records.append(record)
    with open(self.path, "a") as f:
      f.write(strict_json(record) + "\n")


def run(
  exp: Experiment,
  job: Job,
  *,
  resume: bool = False,
  overwrite: bool = False,
  quiet: bool = False,
  log: Log = print,
  hold_lock: contextlib.ExitStack | None = None,
) -> dict:
  """Trains ``job`` as ``exp`` says; returns the final summary (also in summary.json).

  The run directory's lock is taken once the run is set up and held until the run ends, or
  until ``hold_lock`` closes if given (the CLI holds it over the baselines the run compares).
  """
  _check_fits(exp, job)
  with _typos_refused(job.params):
    trainable, base, tx, full_params = _setup(exp, job)
  _check_dir(exp, resume=resume, overwrite=overwrite)  # refuse before touching the directory
  with contextlib.ExitStack() as own:
    (own if hold_lock is None else hold_lock).enter_context(rundir.locked(exp.output_dir))
    out = prepare_dir(exp, resume=resume, overwrite=overwrite)
    if exp.train.compute_dtype == "bfloat16" and base is not None:
      base = cast_frozen(base, jnp.bfloat16)  # once, not in every step
    state, last_eval, metrics = _loop(
      exp, job, out, trainable, base, tx, resume=resume, quiet=quiet, log=log
    )
    return _finish(exp, job, out, state, base, full_params, last_eval, metrics, log=log)


def _combined(state: TrainState, base: Any) -> Any:
  """The params the model runs with: the trained tree, over the frozen base if there is one."""
  return state.params if base is None else c3a.combine(state.params, base)


def _loop(
  exp: Experiment,
  job: Job,
  out: str,
  trainable: Any,
  base: Any,
  tx: optax.GradientTransformation,
  *,
  resume: bool,
  quiet: bool,
  log: Log,
) -> tuple[TrainState, dict | None, _Metrics]:
  """Trains from the last checkpoint (or the start) to ``train.steps``, logging, evaluating
  and checkpointing on the way; on Ctrl-C or SIGTERM saves and exits with 130 or 143.

  Returns the state, the last evaluation (None if none ran) and the metrics file.
  """
  from tqdm.auto import tqdm

  t = exp.train
  step_fn = _step_function(t, job, tx)
  state, position, ckpt = _start(exp, out, trainable, tx, resume=resume, log=log)
  step = saved = logged = int(state.step)  # host-side counters: no device sync per step
  metrics = _Metrics.resume(os.path.join(out, "metrics.jsonl"), step)
  tokens = t.batch_size * job.tokens_per_example
  stream = batches(job.train_data, t.batch_size, t.seed, start=position)
  bar = tqdm(
    total=t.steps,
    initial=step,
    disable=quiet,
    file=sys.stderr,
    dynamic_ncols=True,
    desc=f"{t.mode} train",
  )
  last_eval = None
  busy = 0.0  # seconds spent in training steps since the last log (not eval or saving)
  first_bad = jnp.asarray(-1)  # the first step with a non-finite loss, gradient or params
  with _stop_signal() as received:
    try:
      while step < t.steps and not received:
        start = time.perf_counter()
        state, values = step_fn(state, base, next(stream))
        position += 1
        step += 1
        first_bad = _first_nonfinite(first_bad, values, state.params, state.step)
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps:
          values = {k: float(v) for k, v in values.items()}  # waits for the step
          _refuse_nonfinite(first_bad, step, saved)
          busy += time.perf_counter() - start
          tok_s = tokens * (step - logged) / max(busy, 1e-9)
          logged, busy = step, 0.0
          bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
          metrics.write({"step": step, "split": "train", "tokens_per_s": tok_s, **values})
        else:
          busy += time.perf_counter() - start
        if job.eval_data is not None and (step % t.eval_every == 0 or step == t.steps):
          last_eval = evaluate(job, _combined(state, base), t.eval_batch_size)
          metrics.write({"step": step, "split": "eval", **last_eval})
        if step % t.save_every == 0:
          _refuse_nonfinite(first_bad, step, saved)
          saved = _checkpoint(ckpt, state, position, step, saved)
      bar.close()
      _refuse_nonfinite(first_bad, step, saved)
      _checkpoint(ckpt, state, position, step, saved)
      ckpt.close()  # waits for the save: one that failed is an error here, naming its step
    except KeyboardInterrupt:  # a second signal: stop at once, even inside a step or a save
      _interrupted(ckpt, step, log)
    except BaseException:
      _abandon(ckpt)
      raise
    if received:  # said under the handler: a second signal meanwhile is still one line
      _stopped(received, f"at step {step}: checkpoint saved; continue with --resume", log)
  return state, last_eval, metrics


def _step_function(t: TrainSpec, job: Job, tx: optax.GradientTransformation) -> Callable:
  """The jitted training step of ``train`` settings ``t``; it donates its state."""
  dtype = jnp.bfloat16 if t.compute_dtype == "bfloat16" else None
  return jax.jit(
    make_train_step(
      lambda params, batch, rng: job.loss(params, batch, rng, True),
      tx,
      grad_accum=t.grad_accum,
      compute_dtype=dtype,
      strategy=t.strategy,
    ),
    donate_argnums=0,
  )


def _start(
  exp: Experiment,
  out: str,
  trainable: Any,
  tx: optax.GradientTransformation,
  *,
  resume: bool,
  log: Log,
) -> tuple[TrainState, int, Checkpointer]:
  """The state to train from (the last checkpoint's with ``resume``, else a fresh one), its
  position in the training data, and the run's checkpointer."""
  t = exp.train
  # A copy: the step donates its state, and the job's params must outlive this run.
  state = TrainState.create(jax.tree.map(jnp.copy, trainable), tx, rng=t.seed)
  _refuse_link(out, "adapter" if t.mode == "c3a" else "params.msgpack")  # before training
  _quiet_orbax()
  ckpt = Checkpointer(
    os.path.join(out, "checkpoints"),
    max_to_keep=t.keep_checkpoints,
    config=exp.c3a if t.mode == "c3a" else None,
  )
  position = 0
  if resume and ckpt.latest_step() is not None:
    state, position = ckpt.restore(state)
    log(f"resumed {out} at step {int(state.step)}")
  return state, position, ckpt


def _interrupted(ckpt: Checkpointer, step: int, log: Log) -> None:
  """Exits with 130 after a second signal, the checkpointer abandoned."""
  _abandon(ckpt)
  log(
    f"interrupted at step {step}; a checkpoint cut short is never restored: --resume "
    "continues from the newest complete one"
  )
  raise SystemExit(EXIT_STATUS[signal.SIGINT]) from None


def _stopped(received: list[int], what: str, log: Log) -> None:
  """Exits for the signals ``received``: the first one's status, 130 after a second one (whose
  KeyboardInterrupt was dropped where it was raised, or the run would not be here)."""
  name = signal.Signals(received[0]).name
  log(f"stopped by {name} {what}")
  raise SystemExit(EXIT_STATUS[received[0]] if len(received) == 1 else EXIT_STATUS[signal.SIGINT])


def _abandon(ckpt: Checkpointer) -> None:
  """Closes ``ckpt`` on the way out of an error or an interrupt: a save it cannot finish is not
  what to report (a checkpoint cut short is never restored)."""
  with contextlib.suppress(Exception):
    ckpt.close()


def _refuse_link(out: str, name: str) -> None:
  """A symbolic link where the run writes its adapter would be written through, into the
  link's target (another run's adapter, say): an error naming it."""
  path = os.path.join(out, name)
  if os.path.islink(path):
    raise RunDirError(
      f"{path} is a symbolic link (to {os.readlink(path)}); the run writes its {name} there "
      "and would write through it: remove the link, or choose another output_dir"
    )


class _OrbaxErrors(logging.Filter):
  """Orbax logs each error, traceback and all, before raising it; the run reports what it
  raises in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def _drops_orbax_noise(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """``sys.unraisablehook`` without what orbax's reads and writes cut short by an error or an
  interrupt report from their threads: callbacks into its closed event loops, and reads that
  the error the run reports already stopped."""

  def hook(unraisable: Any) -> None:
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
    if not (closed or any(f"{os.sep}orbax{os.sep}" in f for f in files)):
      previous(unraisable)

  hook.drops_orbax_noise = True
  return hook


def _quiet_orbax() -> None:
  """Installs both filters above, for the rest of the process: orbax's threads may report after
  the run has stopped (on an error or a signal), while the process exits."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
    logger.addFilter(_OrbaxErrors())
  if not getattr(sys.unraisablehook, "drops_orbax_noise", False):
    sys.unraisablehook = _drops_orbax_noise(sys.unraisablehook)


class NonFiniteError(ValueError):
  """The loss or a gradient became NaN or infinite: the run stops, nothing bad is saved."""


@jax.jit
def _first_nonfinite(first: jax.Array, values: dict, params: Any, step: jax.Array) -> jax.Array:
  """``first``, or ``step`` if it is the first whose loss, gradient norm or updated params are
  not finite. The params too: a finite loss and gradient can still overflow them (a large
  learning rate or weight decay), and they are what a save writes.

  Computed on device beside each step, so finding the step costs no host sync; it is read
  where the loop syncs anyway (logging) and before every save.
  """
  ok = jnp.isfinite(values["loss"]) & jnp.isfinite(values["grad_norm"])
  for leaf in jax.tree.leaves(params):
    ok &= jnp.isfinite(leaf).all()
  return jnp.where((first < 0) & ~ok, step, first)


def _refuse_nonfinite(first_bad: jax.Array, step: int, saved: int) -> None:
  bad = int(first_bad)
  if bad >= 0:
    # Every save checks first: the last one saved is finite.
    kept = f"the checkpoint of step {saved} is the last good state" if saved else "none was saved"
    raise NonFiniteError(
      f"the loss, the gradient norm or the parameters became non-finite at step {bad} (stopped "
      f"at step {step}); no checkpoint or adapter was written after it: {kept}. Lower "
      "train.lr, train.head_lr or train.weight_decay, or check the data"
    )


def _checkpoint(ckpt: Checkpointer, state: TrainState, position: int, step: int, saved: int) -> int:
  """Saves ``state`` unless ``step`` is saved already; returns the step now saved."""
  if step != saved:
    ckpt.save(state, data_position=position, force=True)
  return step


def _to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _completes_before_a_signal(write: Callable[..., dict]) -> Callable[..., dict]:
  """``write`` (what a finished run leaves) runs to its end under :func:`_stop_signal`: a
  first Ctrl-C or SIGTERM is recorded, not raised, so it cannot be dropped (a KeyboardInterrupt
  raised inside a gc callback is) nor leave a file half written; then the run stops with the
  signal's status. ``log`` (a keyword) takes that message."""

  @functools.wraps(write)
  def finish(*args: Any, log: Log = _to_stderr, **kwargs: Any) -> dict:
    with _stop_signal() as received:
      final = write(*args, **kwargs)
      if received:
        _stopped(received, f"at step {final['steps']}: the run is complete, its files written", log)
    return final

  return finish


@_completes_before_a_signal
def _finish(
  exp: Experiment,
  job: Job,
  out: str,
  state: TrainState,
  base: Any,
  full_params: Any,
  last_eval: dict | None,
  metrics: _Metrics,
) -> dict:
  """Writes what a finished run leaves (adapter or params, plot, summary.json); the summary."""
  t = exp.train
  counts = c3a.summary(
    full_params if t.mode != "full" else job.params, exp.c3a if t.mode != "full" else None
  )
  final = {
    "mode": t.mode,
    "steps": int(state.step),
    "trainable_params": counts.trainable if t.mode != "full" else counts.total,
    "total_params": counts.total,
  }
  if job.quantized is not None:
    final["quantized_base"] = job.quantized
  if job.eval_data is not None:
    if last_eval is None:  # resumed a finished run: nothing was evaluated in the loop
      last_eval = evaluate(job, _combined(state, base), t.eval_batch_size)
    final.update({f"eval_{k}": v for k, v in last_eval.items()})
  if t.mode == "c3a":
    adapter = os.path.join(out, "adapter")
    c3a.save_adapter(adapter, state.params, adapter_config(exp), key_map=job.key_map)
  else:
    atomic_write(os.path.join(out, "params.msgpack"), flax.serialization.to_bytes(state.params))
  _plot(metrics.records, os.path.join(out, "metrics.png"), f"{out} ({run_name(exp)})")
  atomic_write(os.path.join(out, "summary.json"), strict_json(final, indent=2).encode())
  return final
