"""The c3a-jax CLI end to end, on the offline digits task and on tiny Hugging Face models and
data made locally (save_pretrained into a temp dir, then loaded by path)."""

import glob
import json
import os

import jax
import numpy as np
import pytest
import yaml

import c3a_jax as c3a
from c3a_jax import cli
from c3a_jax.cli import runner
from c3a_jax.cli.experiment import Experiment
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("C3A_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "c3a-cache"))


def train(*args):
  return cli.main(["train", "--quiet", *args])


@pytest.mark.integration
def test_default_job_compares_c3a_with_head_only_and_full(tmp_path, capsys):
  out = tmp_path / "run"
  assert train(f"output_dir={out}") == 0
  printed = capsys.readouterr().out
  rows = {line[:18].strip(): line.split() for line in printed.splitlines()[1:4]}
  accuracy = {name: float(row[-1]) for name, row in rows.items()}
  params = {name: int(row[-3].replace(",", "")) for name, row in rows.items()}
  assert set(accuracy) == {"C3A", "head only", "full fine-tuning"}
  assert accuracy["C3A"] > accuracy["head only"] + 0.03  # adapting the body pays
  assert params["head only"] < params["C3A"] < params["full fine-tuning"] / 5
  # The run directory.
  for name in [
    "config.yaml",
    "metrics.jsonl",
    "metrics.png",
    "summary.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
  ]:
    assert (out / name).is_file(), name
  assert sorted(os.listdir(out / "checkpoints")) == ["100", "200", "300"]
  records = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert {r["split"] for r in records} == {"train", "eval"} and records[-1]["step"] == 300
  assert "tokens_per_s" in records[0]
  summary = json.load(open(out / "summary.json"))
  assert summary["eval_accuracy"] == pytest.approx(accuracy["C3A"], abs=1e-4)
  assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The saved adapter, read back, reproduces the reported accuracy.
  exp = Experiment.load(str(out / "config.yaml"))
  assert exp.c3a.block_size == 16 and exp.train.steps == 300
  assert cli.main(["eval", str(out)]) == 0
  assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(
    summary["eval_accuracy"], abs=1e-6
  )


@pytest.mark.integration
def test_run_directory_rules(tmp_path, capsys):
  out = tmp_path / "run"
  args = [f"output_dir={out}", "train.steps=20", "train.save_every=10", "train.eval_every=10"]
  assert train(*args, "train.mode=head") == 0
  assert train(*args, "train.mode=head") == 2
  assert "holds another run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
  assert train(*args, "train.mode=head", "train.lr=0.5", "--resume") == 2
  assert "the config differs from the run" in capsys.readouterr().err
  # Intervals and the step count may change on resume; so may how output_dir is spelled.
  relative = os.path.relpath(out)
  assert (
    train(
      f"output_dir={relative}",
      "train.steps=30",
      "train.save_every=10",
      "train.eval_every=5",
      "train.mode=head",
      "--resume",
    )
    == 0
  )
  assert train(*args, "train.mode=head", "--overwrite") == 0
  assert train("--resume", f"output_dir={tmp_path / 'none'}") == 2
  assert "holds no run" in capsys.readouterr().err
  keep = tmp_path / "notes"
  keep.mkdir()
  (keep / "thesis.tex").write_text("mine")
  assert train(f"output_dir={keep}", "--overwrite") == 2
  assert "holds no c3a-jax run" in capsys.readouterr().err
  assert (keep / "thesis.tex").read_text() == "mine"
  (out / "mine.txt").write_text("kept")  # --overwrite removes only what a run writes
  assert train(*args, "train.mode=head", "--overwrite") == 0
  assert (out / "mine.txt").read_text() == "kept"
  # Errors a run would meet at its first step come before the directory is touched.
  fresh = tmp_path / "fresh"
  assert train(f"output_dir={fresh}", "train.batch_size=4096") == 2
  assert "train.batch_size=4096 is larger than the 250 training examples" in capsys.readouterr().err
  assert train(f"output_dir={fresh}", "train.grad_accum=3") == 2
  assert "train.grad_accum=3 must divide train.batch_size=32" in capsys.readouterr().err
  assert not fresh.exists()


@pytest.mark.integration
def test_overrides_extend_the_default_config(tmp_path, capsys):
  assert (
    train(
      f"output_dir={tmp_path / 'run'}", "c3a.block_size=32", "train.steps=20", "train.mode=head"
    )
    == 0
  )
  exp = Experiment.load(str(tmp_path / "run" / "config.yaml"))
  assert exp.c3a.block_size == 32 and exp.c3a.target_modules == ("fc0", "fc1")


@pytest.mark.integration
def test_resume_equals_an_unbroken_run(tmp_path):
  common = ["train.save_every=20", "train.eval_every=1000", "train.mode=c3a"]
  assert train(f"output_dir={tmp_path / 'full'}", "train.steps=60", *common) == 0
  assert train(f"output_dir={tmp_path / 'part'}", "train.steps=30", *common) == 0
  assert train(f"output_dir={tmp_path / 'part'}", "train.steps=60", "--resume", *common) == 0
  a = c3a.load_adapter(str(tmp_path / "full" / "adapter"))[0]
  b = c3a.load_adapter(str(tmp_path / "part" / "adapter"))[0]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  steps = [json.loads(line)["step"] for line in open(tmp_path / "part" / "metrics.jsonl")]
  assert steps == sorted(steps) and steps[-1] == 60


@pytest.mark.parametrize(
  "content,match",
  [
    (None, "config file .* does not exist"),
    ("task: [unclosed", "is not valid YAML"),
    ("train:\n  learning_rate: 0.1\n", r"unknown key train.learning_rate \(train has: .*lr"),
    ("train:\n  steps: many\n", "train.steps: Input should be a valid integer, got 'many'"),
    ("train:\n  lr: fast\n", "train.lr: Input should be a valid number.*, got 'fast'"),
    ("task: translation\n", r"task: Input should be 'digits', 'seq_cls'"),
    ("c3a:\n  block_size: 0\n", "C3AConfig.block_size must be a positive integer"),
    ("c3a:\n  rank: 8\n", "unexpected keyword argument 'rank'"),
    ("task: seq_cls\n", "task 'seq_cls' needs model.name"),
    (
      "train:\n  head_lr: -1.0\n",
      "train.head_lr: Input should be greater than or equal to 0, got -1.0",
    ),
    ("data:\n  num_labels: x\n", "data.num_labels: Input should be a valid integer, got 'x'"),
    ("train:\n  strategy: rfft\n", r"train.strategy: strategy='rfft' is not one of"),
  ],
)
def test_bad_configs_are_clear_errors(tmp_path, capsys, content, match):
  path = tmp_path / "config.yaml"
  if content is not None:
    path.write_text(content)
  assert train("--config", str(path), f"output_dir={tmp_path / 'run'}") == 2
  err = capsys.readouterr().err
  assert err.startswith("c3a-jax train: error:")
  assert __import__("re").search(match, err), err


def test_unparsable_overrides_and_huge_integers_are_clear_errors():
  with pytest.raises(ValueError, match=r"override 'train.lr=\[': '\[' is not a YAML value"):
    Experiment.from_dict({}, ["train.lr=["])
  with pytest.raises(
    ValueError, match=r"train.seed: Input should be less than 4294967296, got 99999999999"
  ):
    Experiment.from_dict({"train": {"seed": 99999999999}})
  assert Experiment.from_dict({"train": {"seed": 2**32 - 1}}).train.seed == 2**32 - 1


def test_optional_numbers_are_parsed_and_checked():
  # YAML reads 3e-3 (no dot) as a string; an optional float field takes it as a number.
  exp = Experiment.from_dict(
    {
      "task": "seq_cls",
      "model": {"name": "m"},
      "train": {"head_lr": "3e-3"},
      "data": {"name": "d", "num_labels": 4},
    }
  )
  assert exp.train.head_lr == 0.003 and exp.data.num_labels == 4


def test_a_0_1_config_with_c3a_strategy_still_loads(tmp_path):
  with pytest.warns(FutureWarning, match=r"c3a.strategy is deprecated.*train.strategy='fft'.*rfft"):
    exp = Experiment.from_dict({"c3a": {"block_size": 8, "strategy": "rfft"}})
  assert exp.train.strategy == "fft" and exp.c3a.block_size == 8
  with pytest.warns(FutureWarning):
    exp = Experiment.from_dict({"c3a": {"strategy": "merged"}, "train": {"strategy": "dense"}})
  assert exp.train.strategy == "dense"  # train.strategy, where set, wins
  # A run directory written by 0.1 (c3a.strategy in its config.yaml) can be resumed.
  out = tmp_path / "run"
  out.mkdir()
  exp = Experiment.from_dict({"output_dir": str(out), "train": {"strategy": "fold"}})
  saved = exp.to_dict()
  saved["c3a"]["strategy"] = "merged"
  del saved["train"]["strategy"]
  (out / "config.yaml").write_text(yaml.safe_dump(saved))
  with pytest.warns(FutureWarning):
    assert runner.prepare_dir(exp, resume=True, overwrite=False) == str(out)


def test_shipped_configs_are_valid():
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
  assert len(paths) >= 4
  tasks = {Experiment.load(p).task for p in paths}
  assert {"seq_cls", "causal_lm", "image_cls", "digits"} <= tasks
  sst2 = Experiment.load(os.path.join(ROOT, "configs", "roberta-base-sst2.yaml"))
  assert sst2.c3a.target_modules == ("query", "value") and sst2.c3a.block_size == 768


def test_suggest_block_size(capsys):
  assert cli.main(["suggest-block-size", "digits", "--rank", "4"]) == 0
  out = capsys.readouterr().out
  assert "LoRA rank 4 trains 1,792 parameters" in out
  closest = [line for line in out.splitlines() if "closest" in line]
  assert closest and closest[0].split()[0] == "16"  # 64*128/16 + 128*128/16 = 1536 ~ 1792


def test_a_bit_flipped_digits_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
  from c3a_jax.cli import digits

  monkeypatch.setattr(digits, "PRETRAIN_STEPS", 5)  # a recipe of its own, quick to retrain
  monkeypatch.setenv("C3A_JAX_CACHE", str(tmp_path))
  logged = []
  params = digits.pretrained_params(log=logged.append)  # trains and caches
  (cached,) = tmp_path.iterdir()
  data = bytearray(cached.read_bytes())
  at = data.find(np.asarray(params["fc0"]["kernel"]).tobytes()[:64])
  assert at >= 0
  data[at + 3] ^= 0x40  # an exponent bit of one float32 weight: it grows by about 2**128
  cached.write_bytes(bytes(data))
  logged.clear()
  again = digits.pretrained_params(log=logged.append)
  np.testing.assert_array_equal(again["fc0"]["kernel"], params["fc0"]["kernel"])  # retrained
  assert any(f"cached digits model {cached} is damaged" in m for m in logged), logged
  logged.clear()
  digits.pretrained_params(log=logged.append)
  assert not logged  # the rebuilt cache reads back cleanly


def test_help_is_plain_text_and_states_what_a_bare_train_uses(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  top = capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  text = capsys.readouterr().out
  assert "``" not in top + text  # no reStructuredText markup
  lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
  # A config file's default, then the value a bare `c3a-jax train` (the digits default) uses.
  assert "int = 1000  optimizer steps  (no --config: 300)" in lines["train.steps"]
  assert "(no --config: ['fc0', 'fc1'])" in lines["c3a.target_modules"]
  assert "(no --config: 16)" in lines["c3a.block_size"]
  assert "no --config" not in lines["train.batch_size"]  # 32 either way
  assert "a shipped config's name" in text


def test_configs_ship_in_the_package_and_load_by_name(tmp_path, monkeypatch, capsys):
  from c3a_jax.cli.commands import DIGITS_DEFAULT

  shipped = os.path.join(os.path.dirname(c3a.__file__), "configs")
  names = sorted(n for n in os.listdir(shipped) if n.endswith(".yaml"))
  assert {"digits.yaml", "qwen3_tunix.yaml", "roberta-base-sst2.yaml"} <= set(names)
  assert (
    sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml")) == names
  )
  assert Experiment.load(os.path.join(shipped, "digits.yaml")) == Experiment.from_dict(
    DIGITS_DEFAULT
  )
  pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
  assert '"configs/*.yaml"' in pyproject  # package data: installed with the package
  monkeypatch.chdir(tmp_path)  # not a clone: no configs/ here
  # train.steps=0 stops at validation, after the file was found: the error names the file.
  assert train("--config", "roberta-base-sst2", "train.steps=0") == 2
  assert (
    f"{os.path.join(shipped, 'roberta-base-sst2.yaml')}: train.steps" in capsys.readouterr().err
  )
  assert train("--config", "configs/qwen3_tunix.yaml", "train.steps=0") == 2  # the README's
  assert f"{os.path.join(shipped, 'qwen3_tunix.yaml')}: train.steps" in capsys.readouterr().err
  assert train("--config", "no-such-config") == 2
  err = capsys.readouterr().err
  assert "config file no-such-config does not exist" in err and "digits, llama-alpaca" in err


@pytest.mark.integration
def test_eval_of_runs_that_train_a_head_scores_each_alone(tmp_path, capsys):
  common = ["train.steps=10", "train.eval_every=10", "train.save_every=10"]
  assert train(f"output_dir={tmp_path / 'a'}", *common) == 0
  assert train(f"output_dir={tmp_path / 'b'}", "train.seed=1", *common) == 0
  runs = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "baselines" / "head")]
  alone = {}
  for run in runs:
    capsys.readouterr()
    assert cli.main(["eval", run]) == 0
    alone[run] = json.loads(capsys.readouterr().out)
  capsys.readouterr()
  assert cli.main(["eval", *runs]) == 0
  captured = capsys.readouterr()
  together = json.loads(captured.out)
  assert list(together) == runs
  for run in runs:
    assert together[run] == pytest.approx(alone[run])
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and "one at a time" in err[0], err


@pytest.mark.integration
def test_the_default_run_plots_the_comparison_and_says_what_to_run_next(
  tmp_path, capsys, monkeypatch
):
  import matplotlib.figure

  titles = []
  savefig = matplotlib.figure.Figure.savefig

  def record(fig, *args, **kwargs):
    titles.append(fig._suptitle.get_text() if fig._suptitle else "")
    return savefig(fig, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
  out = tmp_path / "run"
  assert train(f"output_dir={out}", "train.steps=20", "train.eval_every=10") == 0
  printed = capsys.readouterr().out
  runs = [(out, "C3A"), (out / "baselines" / "head", "head only")]
  runs += [(out / "baselines" / "full", "full fine-tuning")]
  assert len(titles) == 4
  for title, (run, mode) in zip(titles, runs, strict=False):
    assert str(run) in title and mode in title, title
  assert str(out) in titles[3] and all(mode in titles[3] for _, mode in runs), titles[3]
  comparison = out / "comparison.png"
  assert comparison.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"comparison plot: {comparison}" in printed
  assert printed.strip().splitlines()[-4:] == [
    "next:",
    f"  c3a-jax eval {out}",
    f"  c3a-jax merge {out} {out}-merged",
    f"  c3a-jax export-lora {out} {out}-lora --rank 8",
  ]
  # --overwrite removes the figure with the rest of the run.
  assert train(f"output_dir={out}", "train.steps=10", "train.mode=head", "--overwrite") == 0
  assert not comparison.exists()


# ----------------------------------------------------------------------------------------------
# Hugging Face models and data, made locally.

transformers = pytest.importorskip("transformers")
WORDS = [
  "good",
  "bad",
  "great",
  "awful",
  "movie",
  "film",
  "plot",
  "fun",
  "dull",
  "the",
  "a",
  "was",
  "is",
  "very",
  "not",
]


def tokenizer(directory):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
  (directory / "vocab.txt").write_text("\n".join(vocab))
  tok = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
  tok.save_pretrained(str(directory))
  return tok


def sentences(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    word = (
      ["bad", "awful", "dull"][rng.integers(3)]
      if label == 0
      else ["good", "great", "fun"][rng.integers(3)]
    )
    rows.append({"sentence": f"the movie was very {word}", "label": label})
  return rows


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bert")
  config = transformers.BertConfig(**dict(tiny.BERT, vocab_size=32, num_labels=2))
  transformers.FlaxBertForSequenceClassification(config, seed=0).save_pretrained(str(d))
  tokenizer(d)
  return d


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def seq_cls_config(tmp_path, bert_dir, **data):
  train_file = write_jsonl(tmp_path / "train.jsonl", sentences(64, 0))
  eval_file = write_jsonl(tmp_path / "eval.jsonl", sentences(32, 1))
  cfg = {
    "task": "seq_cls",
    "model": {"name": str(bert_dir)},
    "data": {
      "name": str(train_file),
      "eval_split": str(eval_file),
      "text_column": "sentence",
      "max_length": 12,
      **data,
    },
    "c3a": {
      "block_size": 16,
      "target_modules": ["query", "value"],
      "modules_to_save": ["classifier"],
      "task_type": "SEQ_CLS",
    },
    "train": {
      "steps": 40,
      "batch_size": 16,
      "lr": 1.0,
      "head_lr": 3e-2,
      "eval_every": 20,
      "save_every": 20,
    },
    "output_dir": str(tmp_path / "run"),
  }
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(cfg))
  return path


@pytest.mark.integration
def test_seq_cls_from_local_model_and_files(tmp_path, bert_dir, capsys):
  config = seq_cls_config(tmp_path, bert_dir)
  assert train("--config", str(config)) == 0
  out = tmp_path / "run"
  summary = json.load(open(out / "summary.json"))
  assert summary["eval_accuracy"] > 0.9  # the toy sentiment is easy
  # The adapter loads back onto the model and reproduces the reported accuracy.
  model = transformers.FlaxBertForSequenceClassification.from_pretrained(str(bert_dir))
  adapter, cfg = c3a.load_adapter(str(out / "adapter"), model.params)
  assert cfg.target_modules == ("query", "value")
  assert cfg.base_model_name_or_path == str(bert_dir)  # model.name, as PEFT records the base
  capsys.readouterr()
  assert cli.main(["eval", str(out)]) == 0
  assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["eval_accuracy"])
  # merge writes a plain Flax model whose logits equal the adapted model's.
  assert cli.main(["merge", str(out), str(tmp_path / "merged")]) == 0
  merged = transformers.FlaxBertForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
  ids = np.asarray(
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))(
      ["the film was great"], return_tensors="np"
    )["input_ids"]
  )
  with c3a.intercept():
    adapted = model(ids, params=c3a.combine(adapter, model.params)).logits
  np.testing.assert_allclose(merged(ids).logits, adapted, atol=1e-5)


@pytest.mark.integration
def test_seq_cls_adapter_loads_in_peft(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  d = tmp_path / "bert_pt"
  d.mkdir()
  config = transformers.BertConfig(**dict(tiny.BERT, vocab_size=32, num_labels=2))
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).save_pretrained(str(d))
  tokenizer(d)
  cfg_path = seq_cls_config(tmp_path, d)
  cfg = yaml.safe_load(cfg_path.read_text())
  cfg["model"]["from_pt"] = True
  cfg_path.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(cfg_path)) == 0
  base = transformers.BertForSequenceClassification.from_pretrained(str(d)).eval()
  pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
  flax_model = transformers.FlaxBertForSequenceClassification.from_pretrained(str(d), from_pt=True)
  adapter, _ = c3a.load_adapter(str(tmp_path / "run" / "adapter"), flax_model.params)
  ids = np.asarray([[2, 9, 4 + 5, 11, 13, 5, 3]])
  with torch.no_grad():
    want = pm(input_ids=torch.as_tensor(ids)).logits.numpy()
  with c3a.intercept():
    got = flax_model(ids, params=c3a.combine(adapter, flax_model.params)).logits
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.integration
def test_bad_data_and_models_are_clear_errors(tmp_path, bert_dir, capsys):
  config = seq_cls_config(tmp_path, bert_dir, text_column="review")
  assert train("--config", str(config)) == 2
  assert "has no column 'review' (columns: ['sentence', 'label'])" in capsys.readouterr().err
  cfg = yaml.safe_load(config.read_text())
  cfg["data"]["text_column"] = "sentence"
  cfg["model"]["name"] = "no-such-org/no-such-model"
  config.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(config), "--overwrite") == 2
  err = capsys.readouterr().err
  assert "could not load model 'no-such-org/no-such-model'" in err and "offline" in err
  cfg["model"]["name"] = str(bert_dir)
  strings = write_jsonl(tmp_path / "strings.jsonl", [{"sentence": "good", "label": "pos"}] * 20)
  cfg["data"].update(name=str(strings), eval_split=None)
  config.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(config), "--overwrite") == 2
  assert "data.label_column 'label' of dataset" in capsys.readouterr().err
  empty = write_jsonl(tmp_path / "empty.jsonl", [])
  cfg["data"].update(name=str(tmp_path / "train.jsonl"), eval_split=str(empty))
  config.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(config), "--overwrite") == 2
  assert "is empty; set data.eval_split to null" in capsys.readouterr().err
  cfg["data"]["name"] = str(tmp_path / "train.jsonl")
  cfg["data"]["eval_split"] = "validation"
  config.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(config), "--overwrite") == 2
  assert "data.eval_split 'validation' is not a file" in capsys.readouterr().err
  cfg["data"]["name"] = "no-such-org/no-such-dataset"
  config.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(config), "--overwrite") == 2
  err = capsys.readouterr().err
  assert "could not load dataset 'no-such-org/no-such-dataset'" in err and "offline" in err


def test_a_local_data_path_that_does_not_exist_is_one_line_at_once(tmp_path):
  from c3a_jax.cli import hub
  from c3a_jax.cli.experiment import DataSpec

  for name in (str(tmp_path / "missing"), "./no/such/data", "data/of/mine"):
    with pytest.raises(FileNotFoundError, match=r"is not a hub dataset name") as e:
      hub.load_split(DataSpec(name=name), "train")
    assert f"data.name {name!r} does not exist" in str(e.value)


@pytest.mark.integration
def test_an_unreachable_hub_is_one_line_without_retries(tmp_path, bert_dir):
  """No HF_HUB_OFFLINE, and a hub that refuses connections: huggingface_hub would retry for
  about 25 s, printing each retry; the CLI finds the hub unreachable once, goes offline (the
  local cache still serves), and says so in one line."""
  import subprocess
  import sys
  import time

  env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
  env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))

  def run(model, dataset):
    config = tmp_path / "config.yaml"
    data = {"name": dataset, "eval_split": None}
    config.write_text(yaml.safe_dump({"task": "seq_cls", "model": {"name": model}, "data": data}))
    start = time.perf_counter()
    proc = subprocess.run(
      [sys.executable, "-m", "c3a_jax", "train", "--quiet", "--config", str(config)],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Retrying" not in proc.stderr, proc.stderr
    progress = ("data: ", "Generating train split")  # a local file's, before the model
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith(progress)]
    assert len(lines) == 1, proc.stderr
    return lines[0], time.perf_counter() - start

  _, imports = run(str(bert_dir), str(tmp_path / "missing.jsonl"))  # fails once imports are done
  data = write_jsonl(tmp_path / "train.jsonl", sentences(8, 0))
  for model, dataset, what in [
    (str(bert_dir), "no-such-org/no-such-dataset", "dataset"),
    ("no-such-org/no-such-model", str(data), "model"),
  ]:
    line, seconds = run(model, dataset)
    assert f"could not load {what} 'no-such-org/no-such-{what}'" in line
    assert "http://127.0.0.1:9 is unreachable" in line
    assert seconds < imports + 12, (seconds, imports)  # the retries alone took 23 s


def test_suggest_block_size_reads_a_tunix_checkpoint(tmp_path, capsys):
  """A Qwen 3 checkpoint, which transformers runs in PyTorch only: Tunix's model, as train's
  model.library: tunix. Only config.json is read (the sizes); no weights are loaded."""
  pytest.importorskip("tunix.models.qwen3.model")
  sizes = dict(tiny.LLAMA, vocab_size=64, head_dim=8, rope_theta=1e6, tie_word_embeddings=False)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **sizes}))
  targets = "q_proj,v_proj,down_proj"
  assert (
    cli.main(["suggest-block-size", str(tmp_path), "--rank", "4", "--target-modules", targets]) == 0
  )
  out = capsys.readouterr().out
  h, i, q, kv = 32, 64, 4 * 8, 2 * 8  # tiny.LLAMA: 4 heads, 2 of keys and values, of 8
  lora = 2 * 4 * ((h + q) + (h + kv) + (i + h))  # two layers
  assert f"LoRA rank 4 trains {lora:,} parameters" in out, out
  assert [line.split()[0] for line in out.splitlines() if "closest" in line] == ["4"]


@pytest.mark.integration
def test_a_max_length_beyond_the_models_positions_is_refused(tmp_path, bert_dir, capsys):
  # Inside jit a position past the table is no error (JAX clamps the index): refuse it first.
  config = seq_cls_config(tmp_path, bert_dir, max_length=100)  # the tiny BERT has 32 positions
  assert train("--config", str(config)) == 2
  assert "data.max_length=100 is longer than the model's 32 positions" in (capsys.readouterr().err)
  assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_causal_lm_with_a_prompt_template(tmp_path, capsys):
  d = tmp_path / "llama"
  d.mkdir()
  config = transformers.LlamaConfig(**dict(tiny.LLAMA, vocab_size=32))
  transformers.FlaxLlamaForCausalLM(config, seed=0).save_pretrained(str(d))
  tokenizer(d)
  rows = [{"instruction": "rate the film", "output": r["sentence"]} for r in sentences(48, 2)]
  data = write_jsonl(tmp_path / "train.json", rows)
  cfg = {
    "task": "causal_lm",
    "model": {"name": str(d)},
    "data": {
      "name": str(data),
      "eval_split": str(data),
      "max_length": 12,
      "prompt_template": "{instruction} {output}",
    },
    "c3a": {
      "block_size": 16,
      "target_modules": ["q_proj", "v_proj", "down_proj"],
      "block_size_pattern": {"down_proj": 8},
      "task_type": "CAUSAL_LM",
    },
    "train": {"steps": 20, "batch_size": 8, "lr": 0.5, "log_every": 5, "compute_dtype": "bfloat16"},
    "output_dir": str(tmp_path / "run"),
  }
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(path)) == 0
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert losses[-1] < losses[0]
  adapter, saved = c3a.load_adapter(str(tmp_path / "run" / "adapter"))
  assert saved.block_size_pattern == {"down_proj": 8}
  assert adapter["model"]["layers"]["0"]["mlp"]["down_proj"]["c3a_kernel"].shape[-1] == 8
  # A second run on the same model and data; eval scores both in mixed batches, each as alone.
  other = tmp_path / "other"
  assert train("--config", str(path), f"output_dir={other}", "train.seed=1", "train.lr=2.0") == 0
  alone = {}
  for run in (tmp_path / "run", other):
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    alone[str(run)] = json.loads(capsys.readouterr().out)
  assert cli.main(["eval", str(tmp_path / "run"), str(other)]) == 0
  both = json.loads(capsys.readouterr().out)
  assert both.keys() == alone.keys() and alone[str(other)] != alone[str(tmp_path / "run")]
  for run, scores in alone.items():
    assert both[run] == pytest.approx(scores, rel=1e-3)  # bfloat16 activations


@pytest.mark.integration
def test_image_classification_from_a_saved_dataset(tmp_path):
  datasets = pytest.importorskip("datasets")
  from PIL import Image

  d = tmp_path / "vit"
  d.mkdir()
  config = transformers.ViTConfig(
    image_size=16,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=2,
  )
  transformers.FlaxViTForImageClassification(config, seed=0).save_pretrained(str(d))
  transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(d))
  rng = np.random.default_rng(0)
  images, labels = [], []
  for i in range(32):
    label = i % 2
    pixels = rng.integers(0, 60, (16, 16, 3)) + (180 if label else 0)
    images.append(Image.fromarray(pixels.astype(np.uint8)))
    labels.append(label)
  ds = datasets.Dataset.from_dict({"img": images, "label": labels})
  datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "data"))
  cfg = {
    "task": "image_cls",
    "model": {"name": str(d)},
    "data": {"name": str(tmp_path / "data"), "eval_split": "test", "image_column": "img"},
    "c3a": {
      "block_size": 16,
      "target_modules": ["query", "value"],
      "modules_to_save": ["classifier"],
    },
    "train": {"steps": 20, "batch_size": 8, "lr": 0.5, "head_lr": 1e-2, "eval_every": 10},
    "output_dir": str(tmp_path / "run"),
  }
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(cfg))
  assert train("--config", str(path)) == 0
  assert json.load(open(tmp_path / "run" / "summary.json"))["eval_accuracy"] > 0.9
