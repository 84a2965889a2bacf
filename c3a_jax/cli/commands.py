"""``c3a-jax``: fine-tune with C3A from the command line.

    c3a-jax train [--config FILE] [--resume | --overwrite] [key=value ...]
    c3a-jax eval RUN_DIR
    c3a-jax merge RUN_DIR OUT_DIR [--overwrite]
    c3a-jax export-lora RUN_DIR OUT_DIR --rank R [--overwrite]
    c3a-jax suggest-block-size MODEL [--rank 8] [--target-modules query,value]

With no config, ``train`` runs the offline default: the digits task (c3a_jax.cli.digits),
C3A against head-only and full fine-tuning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Sequence

from c3a_jax.cli.experiment import Experiment, fields_help

# The offline default: C3A on the digits MLP's hidden layers, the paper's large C3A learning rate.
DIGITS_DEFAULT = {
  "task": "digits",
  "c3a": {"block_size": 16, "target_modules": ["fc0", "fc1"], "modules_to_save": ["head"]},
  "train": {
    "steps": 300,
    "batch_size": 32,
    "lr": 0.3,
    "head_lr": 3e-3,
    "eval_every": 100,
    "save_every": 100,
    "log_every": 10,
  },
}


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def shipped_configs() -> dict[str, str]:
  """The experiment configs installed with the package (``c3a_jax/configs``), by name."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  return {n[: -len(".yaml")]: os.path.join(folder, n) for n in names if n.endswith(".yaml")}


def config_file(name: str) -> str:
  """``--config``'s file: ``name`` if it exists, else the shipped config of that name
  (``roberta-base-sst2``, ``digits.yaml``, or ``configs/digits.yaml`` as the README spells it,
  so that its commands work outside a clone)."""
  if os.path.exists(name):
    return name
  stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
  folder, stem = os.path.split(stem)
  shipped = shipped_configs()
  if folder in ("", "configs") and stem in shipped:
    return shipped[stem]
  raise FileNotFoundError(
    f"config file {name} does not exist, and no shipped config has that name (shipped: "
    f"{', '.join(shipped)})"
  )


def _job(exp: Experiment):
  if exp.task == "digits":
    from c3a_jax.cli import digits

    return digits.job(exp.train.seed, log=_log)
  if exp.model.library == "tunix":
    from c3a_jax.cli import tunix

    return tunix.job(exp, log=_log)
  from c3a_jax.cli import hub

  return hub.job(exp, log=_log)


def train(args: argparse.Namespace) -> int:
  """``c3a-jax train``: one run (with the digits default, also its two baselines)."""
  from c3a_jax.cli import runner

  exp = (
    Experiment.load(config_file(args.config), args.overrides)
    if args.config
    else Experiment.from_dict(DIGITS_DEFAULT, args.overrides, source="default config")
  )
  runs = [(exp, args.resume, args.overwrite), *_baselines(exp, resume=args.resume)]
  # Before the model loads (minutes, for a real checkpoint), refuse what can be refused. The
  # baselines' directories matter on --resume only: else the run's --overwrite clears them.
  for other, resume, overwrite in runs if args.resume else runs[:1]:
    runner.check(other, resume=resume, overwrite=overwrite)
  _check_data(exp)
  job = _job(exp)
  # The run's lock is held from its first write to its last, the baselines included: they
  # train inside its directory, which another process's --overwrite would delete under them.
  with contextlib.ExitStack() as held:
    summaries = [
      runner.run(
        other,
        job,
        resume=resume,
        overwrite=overwrite,
        quiet=args.quiet,
        log=_log,
        hold_lock=held if other is exp else None,
      )
      for other, resume, overwrite in runs
    ]
    _print_table(summaries)
    if job.quantized is not None:
      print(f"base: {job.quantized}")
    print(f"run directory: {exp.output_dir}")
    _wrap_up(exp, summaries)  # writes the comparison plot into the run directory
  return 0


def _baselines(exp: Experiment, *, resume: bool) -> list[tuple[Experiment, bool, bool]]:
  """The comparison the digits default exists for, in ``baselines/<mode>`` of its directory:
  same data and steps, other trainable sets. Each as (experiment, resume, overwrite): --resume
  continues a baseline that started (one that finished is not retrained) and starts the rest."""
  if exp.task != "digits" or exp.train.mode != "c3a":
    return []
  runs = []
  for mode in ("head", "full"):
    # model_copy skips validation: these values come from the validated config.
    train = exp.train.model_copy(update={"mode": mode, "lr": exp.train.head_lr or exp.train.lr})
    out = os.path.join(exp.output_dir, "baselines", mode)
    started = resume and os.path.isfile(os.path.join(out, "config.yaml"))
    runs.append((exp.model_copy(update={"output_dir": out, "train": train}), started, not started))
  return runs


def _check_data(exp: Experiment) -> None:
  """A data file (CSV or JSON) or local dataset path that does not exist, refused before the
  model loads (Tunix loads it before the data); hub names are looked up with the data."""
  if exp.task == "digits":
    return
  # A missing package first: it is the first thing to fix, and what loading would hit first.
  import datasets  # noqa: F401
  import transformers  # noqa: F401

  from c3a_jax.cli import hub

  spec = exp.data
  if os.path.splitext(spec.name)[1].lower() not in hub.FILE_FORMATS:
    hub.check_local(spec.name, "data.name", "dataset")
    return
  if not os.path.isfile(spec.name):
    raise FileNotFoundError(f"data file {spec.name} does not exist")
  if spec.eval_split is not None and not os.path.isfile(spec.eval_split):
    raise FileNotFoundError(
      f"data.eval_split {spec.eval_split!r} is not a file: with a data file as data.name, set "
      "data.eval_split to an eval file, or to null"
    )


def _print_table(summaries: list[dict]) -> None:
  from c3a_jax.cli.runner import MODE_NAMES as names

  print(f"{'training':<18} {'trainable params':>17} {'share':>8} {'eval accuracy':>14}")
  for s in summaries:
    share = s["trainable_params"] / s["total_params"]
    acc = f"{s['eval_accuracy']:.4f}" if "eval_accuracy" in s else "(no eval)"
    print(f"{names[s['mode']]:<18} {s['trainable_params']:>17,} {share:>8.2%} {acc:>14}")


def _wrap_up(exp: Experiment, summaries: list[dict]) -> None:
  """What the console ends with: the comparison plot of a run with baselines, then the
  commands that use the run."""
  if len(summaries) > 1:
    print(f"comparison plot: {_plot_comparison(exp, summaries)}")
  print("next:")
  for command in _next_commands(exp):
    print(f"  {command}")


def _plot_comparison(exp: Experiment, summaries: list[dict]) -> str:
  """Plots the run beside its baselines (``baselines/<mode>``) as ``comparison.png`` in the
  run directory; returns its path."""
  from c3a_jax.cli import runner

  runs = {}
  for mode in (s["mode"] for s in summaries):
    baseline = os.path.join(exp.output_dir, "baselines", mode)
    other = exp.model_copy(update={"train": exp.train.model_copy(update={"mode": mode})})
    runs[runner.run_name(other)] = exp.output_dir if mode == exp.train.mode else baseline
  path = os.path.join(exp.output_dir, "comparison.png")
  runner.plot_comparison(runs, path, f"{exp.output_dir}: {' vs '.join(runs)}")
  return path


def _next_commands(exp: Experiment) -> list[str]:
  """The commands that evaluate, merge and export the run, with its path."""
  run = os.path.normpath(exp.output_dir)
  commands = [f"c3a-jax eval {shlex.quote(run)}"]
  commands.append(f"c3a-jax merge {shlex.quote(run)} {shlex.quote(run + '-merged')}")
  if exp.train.mode == "c3a":  # export-lora exports a C3A adapter
    lora = shlex.quote(run + "-lora")
    commands.append(f"c3a-jax export-lora {shlex.quote(run)} {lora} --rank 8")
  return commands


def evaluate(args: argparse.Namespace) -> int:
  """``c3a-jax eval RUN_DIR [RUN_DIR ...]``: loss and accuracy of finished runs, as JSON.

  Several C3A runs of one model and one dataset are scored together: each eval batch goes
  through all their adapters at once, as a mixed batch (``c3a.stack_adapters``). Runs that
  train more than an adapter (a head, biases, every weight) are scored one at a time, with a
  line that says so.
  """
  import c3a_jax as c3a
  from c3a_jax.cli import runner

  runs = {d: _load_run(d) for d in dict.fromkeys(args.run_dirs)}
  (first, (exp, params)), *others = runs.items()
  for run_dir, (other, _) in others:
    for field in ("task", "model", "data"):
      if getattr(other, field) != getattr(exp, field):
        raise ValueError(
          f"{run_dir}: its {field} differs from {first}'s; runs evaluated together share the "
          "model and the data"
        )
  job = _job(exp)
  if job.eval_data is None:
    raise ValueError(f"{first}: the config has no eval split (data.eval_split)")
  if not others:
    print(json.dumps(runner.evaluate(job, params(job), exp.train.eval_batch_size), indent=2))
    return 0
  reason = _why_alone(runs)
  if reason is None:
    adapters = {d: _adapter(d, e, job) for d, (e, _) in runs.items()}
    try:
      stacked = c3a.stack_adapters(adapters)
    except ValueError as e:  # e.g. block sizes that differ on a layer
      reason = str(e)
  if reason is None:
    mixed = runner.evaluate_mixed(
      job, c3a.combine(stacked, job.params), len(adapters), exp.train.eval_batch_size
    )
    scores = dict(zip(adapters, mixed, strict=True))
  else:
    _log(f"c3a-jax eval: scoring the runs one at a time: {reason}")
    scores = {
      d: runner.evaluate(job, p(job), e.train.eval_batch_size) for d, (e, p) in runs.items()
    }
  print(json.dumps(scores, indent=2))
  return 0


def _why_alone(runs: dict) -> str | None:
  """Why ``runs`` cannot share mixed batches, or None. A mixed batch runs one base model with
  a set of C3A adapters; a run's own head or biases, or all its weights, are not an adapter."""
  for run_dir, (exp, _) in runs.items():
    if exp.train.mode != "c3a":
      return f"{run_dir} trained train.mode={exp.train.mode}, not a C3A adapter alone"
    if exp.c3a.modules_to_save or exp.c3a.bias != "none":
      return f"{run_dir} also trains a head or biases (c3a.modules_to_save, c3a.bias)"
  return None


def _adapter(run_dir: str, exp: Experiment, job) -> dict:
  """The C3A adapter a finished run saved."""
  import c3a_jax as c3a

  if exp.train.mode != "c3a":
    raise ValueError(f"{run_dir} trained {exp.train.mode!r}, not a C3A adapter")
  if not os.path.isdir(os.path.join(run_dir, "adapter")):
    raise FileNotFoundError(
      f"{run_dir} holds no adapter/: the run did not finish; continue it with "
      "c3a-jax train --resume"
    )
  return c3a.load_adapter(os.path.join(run_dir, "adapter"), job.params, key_map=job.key_map)[0]


def _load_run(run_dir: str):
  """(experiment, params_of(job)) for a finished run directory."""
  import flax.serialization

  import c3a_jax as c3a

  config = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
  exp = Experiment.load(config)

  def params(job):
    if exp.train.mode == "c3a":
      return c3a.combine(_adapter(run_dir, exp, job), job.params)
    path = os.path.join(run_dir, "params.msgpack")
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path} does not exist: the run did not finish; continue it with c3a-jax train --resume"
      )
    with open(path, "rb") as f:
      data = f.read()
    if exp.train.mode == "full":
      return flax.serialization.from_bytes(job.params, data)
    adapter, _ = c3a.split(job.params, exp.c3a)
    return c3a.combine(flax.serialization.from_bytes(adapter, data), job.params)

  return exp, params


def _same_or_inside(path: str, other: str) -> bool:
  path, other = os.path.realpath(path), os.path.realpath(other)
  return path == other or path.startswith(other + os.sep)


_WRITES = {
  "merge": (
    "the merged model",
    "would replace the base, and the adapter would then be applied twice",
  ),
  "export-lora": (
    "the LoRA adapter",
    "would mix adapter files into the base's, and transformers' Auto classes would then load "
    "the directory as the adapter",
  ),
}


def _check_merge_target(
  out_dir: str, run_dir: str, exp: Experiment, *, overwrite: bool, command: str = "merge"
) -> None:
  """Refuses an OUT_DIR whose files ``command``'s output would overwrite: the base model's own
  directory and the run directory always, any other non-empty directory without --overwrite."""
  what, why = _WRITES[command]
  base = exp.model.name
  if base and os.path.isdir(base) and _same_or_inside(out_dir, base):
    raise ValueError(
      f"{command}: {out_dir} is the base model's directory ({base}); writing {what} "
      f"there {why}. Choose another OUT_DIR"
    )
  if _same_or_inside(out_dir, run_dir):
    raise ValueError(f"{command}: {out_dir} is inside the run directory {run_dir}; choose another")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(
      f"{command}: {out_dir} is not empty; pass --overwrite to write {what} into it "
      "(files of the same names are replaced, nothing else is deleted)"
    )


def full_precision(exp: Experiment) -> Experiment:
  """``exp`` with its base as loaded (no model.quantize): what merge folds an adapter into."""
  if exp.model.quantize is None:
    return exp
  return exp.model_copy(update={"model": exp.model.model_copy(update={"quantize": None})})


def merge(args: argparse.Namespace) -> int:
  """``c3a-jax merge RUN_DIR OUT_DIR``: the adapter folded in, saved as a plain model."""
  import c3a_jax as c3a

  exp, params = _load_run(args.run_dir)
  _check_merge_target(args.out_dir, args.run_dir, exp, overwrite=args.overwrite)
  if exp.model.quantize is not None:
    _log(
      f"merge: the adapter, trained over the {exp.model.quantize.label()} base, is merged into "
      "the full-precision base (a quantized kernel would round the delta away)"
    )
  job = _job(full_precision(exp))
  if job.base_checkpoint is not None:  # the Hugging Face checkpoint, its weights adapted
    adapter = os.path.join(args.run_dir, "adapter")
    c3a.merge_checkpoint(job.base_checkpoint, adapter, args.out_dir, overwrite=args.overwrite)
    print(f"merged model written to {args.out_dir}")
    return 0
  merged = c3a.merge(params(job), safe=True)
  if job.save_merged is None:
    import flax.serialization

    from c3a_jax.io import atomic_write

    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write(os.path.join(args.out_dir, "params.msgpack"), flax.serialization.to_bytes(merged))
  else:
    job.save_merged(merged, args.out_dir)
  print(f"merged model written to {args.out_dir}")
  return 0


def export_lora(args: argparse.Namespace) -> int:
  """``c3a-jax export-lora RUN_DIR OUT_DIR --rank R``: the adapter as a PEFT LoRA adapter
  (each layer's delta truncated to rank R), with each layer's relative error."""
  import warnings

  import c3a_jax as c3a
  from c3a_jax.cli import runner

  exp, params = _load_run(args.run_dir)
  if exp.train.mode != "c3a":
    raise ValueError(
      f"export-lora: {args.run_dir} is a train.mode={exp.train.mode} run; it holds no C3A "
      "adapter to export"
    )
  _check_merge_target(
    args.out_dir, args.run_dir, exp, overwrite=args.overwrite, command="export-lora"
  )
  job = _job(full_precision(exp))  # the adapter alone is exported: no base to quantize
  with warnings.catch_warnings():
    # The table below names every layer's error; the library's warning would repeat it.
    warnings.filterwarnings("ignore", message=r"save_adapter\(as_lora=\.\.\.\): the rank-")
    errors = c3a.save_adapter(
      args.out_dir, params(job), runner.adapter_config(exp), key_map=job.key_map, as_lora=args.rank
    )
  width = max(len("layer"), *map(len, errors))
  print(f"{'layer':<{width}}  relative error")
  for name, error in errors.items():
    print(f"{name:<{width}}  {error:>14.6f}")
  print(f"rank {args.rank}: {c3a.LoraExport({}, errors).describe()}")
  print(f"LoRA adapter written to {args.out_dir}")
  return 0


def suggest(args: argparse.Namespace) -> int:
  """``c3a-jax suggest-block-size MODEL``: block sizes near a LoRA rank's budget."""
  from c3a_jax.cli import blocks

  print(
    blocks.report(
      args.model,
      rank=args.rank,
      target_modules=args.target_modules,
      from_pt=args.from_pt,
      library=args.library,
    )
  )
  return 0


def parser() -> argparse.ArgumentParser:
  """The ``c3a-jax`` argument parser and its subcommands."""
  # Help is plain text: the docstring's reStructuredText literals lose their backquotes.
  description = __doc__.split("\n\n")[0].replace("``", "")
  p = argparse.ArgumentParser(prog="c3a-jax", description=description)
  sub = p.add_subparsers(dest="command", required=True)
  _add_train(sub)
  e = sub.add_parser("eval", help="evaluate finished runs (several C3A runs: in mixed batches)")
  e.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  e.set_defaults(fn=evaluate)
  m = sub.add_parser("merge", help="fold the adapter into the model and save it")
  m.add_argument("run_dir")
  m.add_argument("out_dir")
  m.add_argument(
    "--overwrite", action="store_true", help="write into a non-empty OUT_DIR (deletes nothing)"
  )
  m.set_defaults(fn=merge)
  x = sub.add_parser(
    "export-lora", help="save the adapter as a PEFT LoRA adapter of a given rank, for serving"
  )
  x.add_argument("run_dir")
  x.add_argument("out_dir")
  x.add_argument(
    "--rank", type=int, required=True, help="the LoRA rank (min(d_in, d_out) is exact)"
  )
  x.add_argument(
    "--overwrite", action="store_true", help="write into a non-empty OUT_DIR (deletes nothing)"
  )
  x.set_defaults(fn=export_lora)
  _add_suggest(sub)
  return p


def _add_train(sub: argparse._SubParsersAction) -> None:
  t = sub.add_parser(
    "train",
    help="fine-tune (no config: the offline digits default)",
    epilog=fields_help(DIGITS_DEFAULT),
    formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog is a table
  )
  t.add_argument(
    "--config",
    metavar="FILE",
    help=f"a YAML config file, or a shipped config's name: {', '.join(shipped_configs())}",
  )
  group = t.add_mutually_exclusive_group()
  group.add_argument("--resume", action="store_true", help="continue the run in output_dir")
  group.add_argument("--overwrite", action="store_true", help="replace the run in output_dir")
  t.add_argument("--quiet", action="store_true", help="no progress bars")
  t.add_argument(
    "overrides",
    nargs="*",
    metavar="key=value",
    help="config overrides, e.g. train.lr=0.3 c3a.block_size=128",
  )
  t.set_defaults(fn=train)


def _add_suggest(sub: argparse._SubParsersAction) -> None:
  s = sub.add_parser(
    "suggest-block-size", help="block sizes near a LoRA rank's parameter budget, for a model"
  )
  s.add_argument("model", help="a hub name, a local model directory, or 'digits'")
  s.add_argument("--rank", type=int, default=8, help="the LoRA rank to match (default 8)")
  s.add_argument(
    "--target-modules", default=None, help="comma-separated layer names (default: the model type's)"
  )
  s.add_argument("--from-pt", action="store_true", help="load PyTorch weights")
  s.add_argument(
    "--library",
    choices=("transformers", "tunix"),
    default=None,
    help="as train's model.library (default: transformers, or tunix for a model type that "
    "transformers has no Flax model of, such as qwen3)",
  )
  s.set_defaults(fn=suggest)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` and runs the subcommand; bad input is exit status 2 with one line."""
  p = parser()
  # Overrides may follow flags (`train --resume train.steps=100`): collect the strays.
  args, extra = p.parse_known_args(argv)
  if extra and (args.command != "train" or any("=" not in e or e.startswith("-") for e in extra)):
    p.error(f"unrecognized arguments: {' '.join(extra)}")
  if extra:
    args.overrides = [*args.overrides, *extra]
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"c3a-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
