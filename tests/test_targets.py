"""Target selection follows PEFT 0.21's rules on params-tree paths."""

import warnings

import numpy as np
import pytest

import c3a_jax as c3a


def dense(d_in, d_out):
  return {"kernel": np.zeros((d_in, d_out), np.float32), "bias": np.zeros(d_out, np.float32)}


def encoder(layers=3, d=32, ffn=64):
  """A RoBERTa-shaped params tree (shapes only matter)."""
  layer = lambda: {
    "attention": {
      "self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
      "output": {"dense": dense(d, d), "LayerNorm": {"scale": np.ones(d), "bias": np.zeros(d)}},
    },
    "intermediate": {"dense": dense(d, ffn)},
    "output": {"dense": dense(ffn, d)},
  }
  return {
    "roberta": {
      "embeddings": {"word_embeddings": {"embedding": np.zeros((50, d))}},
      "encoder": {"layer": {str(i): layer() for i in range(layers)}},
    },
    "classifier": {"dense": dense(d, d), "out_proj": dense(d, 3)},
  }


def paths(cfg, params=None, **kw):
  return [t.path for t in c3a.select(encoder() if params is None else params, cfg, **kw)]


def test_list_matches_whole_name_suffixes():
  got = paths(c3a.C3AConfig(block_size=8, target_modules=["query", "output.dense"]))
  assert got == [
    f"roberta.encoder.layer.{i}.{p}"
    for i in range(3)
    for p in ("attention.self.query", "attention.output.dense", "output.dense")
  ]
  # "dense" alone would also match the classifier's dense: only ".dense" suffixes count.
  assert "classifier.dense" in paths(c3a.C3AConfig(block_size=8, target_modules=["dense"]))


def test_suffix_must_start_at_a_dot():
  with pytest.raises(ValueError, match="matched no layer"):
    c3a.select(encoder(), c3a.C3AConfig(block_size=8, target_modules=["uery"]))


def test_regex_matches_the_whole_path():
  cfg = c3a.C3AConfig(block_size=8, target_modules=r".*layer\.[02]\..*(query|value)")
  assert paths(cfg) == [
    f"roberta.encoder.layer.{i}.attention.self.{n}" for i in (0, 2) for n in ("query", "value")
  ]
  with pytest.raises(ValueError, match="matched no layer"):  # fullmatch, not search
    c3a.select(encoder(), c3a.C3AConfig(block_size=8, target_modules="query"))


def test_all_linear_skips_the_head():
  got = paths(c3a.C3AConfig(block_size=8, target_modules="all-linear"))
  assert len(got) == 3 * 6 and not any(p.startswith("classifier") for p in got)


def test_exclude_modules_list_and_regex():
  got = paths(
    c3a.C3AConfig(
      block_size=8,
      target_modules=["query", "value"],
      exclude_modules=["layer.1.attention.self.value"],
    )
  )
  assert "roberta.encoder.layer.1.attention.self.value" not in got and len(got) == 5
  got = paths(
    c3a.C3AConfig(block_size=8, target_modules=["query", "value"], exclude_modules=r".*\.1\..*")
  )
  assert len(got) == 4 and not any(".1." in p for p in got)


def test_modules_to_save_are_never_targets():
  cfg = c3a.C3AConfig(block_size=8, target_modules=["dense"], modules_to_save=["classifier"])
  assert not any(p.startswith("classifier") for p in paths(cfg))


@pytest.mark.parametrize(
  "layers,pattern,expected",
  [
    (1, None, [1]),
    ([0, 2], None, [0, 2]),
    ([2], "layer", [2]),
    ([0], ["blocks", "layer"], [0]),
    ([0], "blocks", []),
  ],
)
def test_layers_to_transform(layers, pattern, expected):
  cfg = c3a.C3AConfig(
    block_size=8, target_modules=["query"], layers_to_transform=layers, layers_pattern=pattern
  )
  if not expected:
    with pytest.raises(ValueError, match="matched no layer"):
      paths(cfg)
    return
  assert paths(cfg) == [f"roberta.encoder.layer.{i}.attention.self.query" for i in expected]


def test_layer_index_is_the_first_number():
  # An MoE-like path: the expert index must not be taken for the layer index.
  params = {
    "model": {
      "layers": {
        str(i): {"experts": {str(e): {"w1": dense(8, 8)} for e in range(3)}} for i in range(2)
      }
    }
  }
  cfg = c3a.C3AConfig(block_size=4, target_modules=["w1"], layers_to_transform=[1])
  assert paths(cfg, params) == [f"model.layers.1.experts.{e}.w1" for e in range(3)]


def test_block_size_pattern_first_key_wins():
  cfg = c3a.C3AConfig(
    block_size=16,
    target_modules=["query", "intermediate.dense"],
    block_size_pattern={"intermediate.dense": 8, r"layer\.0\..*query": 4, "query": 32},
  )
  sizes = {t.path: t.block_size for t in c3a.select(encoder(), cfg)}
  assert sizes["roberta.encoder.layer.0.attention.self.query"] == 4
  assert sizes["roberta.encoder.layer.1.attention.self.query"] == 32
  assert sizes["roberta.encoder.layer.2.intermediate.dense"] == 8
  t = next(t for t in c3a.select(encoder(), cfg) if t.path.endswith("2.intermediate.dense"))
  assert (t.d_in, t.d_out, t.shape) == (32, 64, (8, 4, 8))


def test_block_size_that_does_not_divide_names_layer_and_sizes():
  cfg = c3a.C3AConfig(block_size=24, target_modules=["intermediate.dense"])
  with pytest.raises(
    ValueError,
    match=r"block size 24 does not divide layer "
    r"'roberta.encoder.layer.0.intermediate.dense': kernel \(32, 64\) has "
    r"d_in=32, d_out=64; block sizes that divide both: \[1, 2, 4, 8, 16, 32\]",
  ):
    c3a.select(encoder(), cfg)


def test_non_dense_target_is_an_error():
  with pytest.raises(
    ValueError,
    match=r"'roberta.encoder.layer.0.attention.output.LayerNorm'.*"
    r"not a linear layer",
  ):
    c3a.select(encoder(), c3a.C3AConfig(block_size=8, target_modules=["LayerNorm"]))
  with pytest.raises(ValueError, match="word_embeddings.*not a linear layer"):
    c3a.select(encoder(), c3a.C3AConfig(block_size=8, target_modules=["word_embeddings"]))
  with pytest.raises(ValueError, match=r"'roberta.encoder.layer.0.attention.self'.*not a linear"):
    c3a.select(encoder(), c3a.C3AConfig(block_size=8, target_modules=["self"]))


def test_unmatched_block_size_pattern_key_is_an_error():
  cfg = c3a.C3AConfig(block_size=8, target_modules=["query"], block_size_pattern={"value": 4})
  with pytest.raises(ValueError, match="block_size_pattern key 'value' matches no C3A target"):
    c3a.select(encoder(), cfg)


def test_default_targets_by_model_type():
  cfg = c3a.C3AConfig(block_size=8)
  assert len(paths(cfg, model_type="roberta")) == 6
  with pytest.raises(ValueError, match="target_modules is None and model_type=None"):
    paths(cfg)
  with pytest.raises(ValueError, match="model_type='unknown-model'"):
    paths(cfg, model_type="unknown-model")
  # What target_modules=None selects, by name (PEFT's table).
  assert c3a.default_targets("roberta") == ("query", "value")
  assert c3a.default_targets("gpt2") == ("mlp.c_proj",)
  with pytest.raises(ValueError, match=r"model_type=None has no default targets \(known: bart,"):
    c3a.default_targets(None)


def test_conv1d_layout_for_gpt2():
  params = {
    "transformer": {
      "h": {"0": {"mlp": {"c_fc": {"kernel": np.zeros((64, 16)), "bias": np.zeros(64)}}}}
    }
  }
  cfg = c3a.C3AConfig(block_size=8, target_modules=["c_fc"])
  (t,) = c3a.select(params, cfg, model_type="gpt2")
  assert t.out_in and (t.d_in, t.d_out) == (16, 64) and t.shape == (8, 2, 8)
  (t,) = c3a.select(params, cfg)
  assert not t.out_in and (t.d_in, t.d_out) == (64, 16)


def test_block_size_pattern_key_may_be_the_whole_path():
  # PEFT falls back to the full module name as a dict key when no regex key matches.
  params = {"dense_0": {"kernel": np.zeros((32, 32))}, "enc": {"q": {"kernel": np.zeros((32, 32))}}}
  cfg = c3a.C3AConfig(
    block_size=8, target_modules=["dense_0", "q"], block_size_pattern={"enc.q": 16, "dense_0": 4}
  )
  assert {t.path: t.block_size for t in c3a.select(params, cfg)} == {"dense_0": 4, "enc.q": 16}


def test_gpt2_names_without_model_type_warn():
  params = {"h": {"0": {"c_attn": {"kernel": np.zeros((16, 48))}}}}
  with pytest.warns(UserWarning, match="'h.0.c_attn' is named like GPT-2's Conv1D"):
    c3a.select(params, c3a.C3AConfig(block_size=8, target_modules=["c_attn"]))


def test_a_list_entry_that_matches_no_layer_is_a_warning_naming_it():
  """A typo in one entry ("valeu") used to adapt the rest silently. Each list entry is a name
  suffix, so one that selects no layer is named, with the nearest layer name; the CLI makes
  the warning (c3a.UnmatchedTargetWarning) an error."""
  cfg = c3a.C3AConfig(block_size=8, target_modules=["query", "valeu"])
  with pytest.warns(
    c3a.UnmatchedTargetWarning, match=r"target_modules entry 'valeu' matches no"
  ) as w:
    got = paths(cfg)
  assert got == [f"roberta.encoder.layer.{i}.attention.self.query" for i in range(3)]
  assert [x.message.entries for x in w] == [("valeu",)]
  assert [x.message.field for x in w] == ["target_modules"]
  assert "did you mean 'value'?" in str(w[0].message)


def test_unmatched_exclude_entries_warn_and_regex_strings_do_not():
  cfg = c3a.C3AConfig(
    block_size=8,
    target_modules=["query", "value"],
    exclude_modules=["0.attention.self.query", "qeury"],
  )
  with pytest.warns(c3a.UnmatchedTargetWarning, match=r"exclude_modules entry 'qeury'") as w:
    assert len(paths(cfg)) == 5
  assert [x.message.entries for x in w] == [("qeury",)]
  with warnings.catch_warnings():
    warnings.simplefilter("error", c3a.UnmatchedTargetWarning)
    # A string is a regex: its alternatives cannot be told apart, so it is not checked.
    paths(c3a.C3AConfig(block_size=8, target_modules=r".*\.(query|valeu)", exclude_modules="x"))
    # An entry that names only modules kept in modules_to_save is no typo: not warned about.
    paths(c3a.C3AConfig(block_size=8, target_modules=["query", "dense"], modules_to_save=["dense"]))
