"""The rule table: one entry per logical name, every model name covered, no mesh axis in models."""

import re

import pytest

from sharding import rules as rules_lib
from sharding import specs
from tests.sharding import common

MODEL_FILES = sorted(p for p in (common.ROOT / "deepseek_jax").glob("*.py")
                     if p.name != "__init__.py")


def test_default_rules_are_one_entry_per_name():
  names = [n for n, _ in rules_lib.DEFAULT_RULES]
  assert len(names) == len(set(names))
  assert rules_lib.check_rules(rules_lib.DEFAULT_RULES) == rules_lib.DEFAULT_RULES
  assert not set(names) & set(rules_lib.MESH_AXES)


def _model_logical_names():
  table = specs.logical_table(common.abstract_variables(common.small_cfg()))
  names = {n for names in table.values() for n in names if n}
  for path in MODEL_FILES:
    names |= set(re.findall(r"[\"'](act_[a-z_]+)[\"']", path.read_text()))
  return names


def test_every_model_logical_name_has_a_rule():
  names = _model_logical_names()
  assert {"embed", "experts", "layers", "act_batch"} <= names  # the scan found the model's names
  missing = names - {n for n, _ in rules_lib.DEFAULT_RULES}
  assert not missing, f"logical names without a rule in sharding/rules.py: {sorted(missing)}"


def test_model_code_names_no_mesh_axis():
  pattern = re.compile(r"[\"'](%s)[\"']" % "|".join(rules_lib.MESH_AXES))
  hits = [f"{p}:{i + 1}" for p in MODEL_FILES
          for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
  assert not hits, f"mesh-axis names in model code: {hits}"


def test_tokens_and_batch_agree():
  table = dict(rules_lib.DEFAULT_RULES)
  assert table["act_tokens"] == table["act_batch"]
  assert table["act_experts"] == table["experts"]


@pytest.mark.parametrize("rules, match", [
    ((("embed", "fsdp"), ("embed", "tensor")), r"'embed' appears twice"),
    ((("embed", "fdsp"),), r"mesh axis 'fdsp' is not one of"),
    ((("data", "fsdp"),), r"logical name 'data' is also a mesh axis"),
    ((("embed", ("fsdp", "fsdp")),), r"repeats a mesh axis"),
    ((("embed",),), r"must be a \(logical_name, mesh_axes\) pair"),
])
def test_bad_rules_raise(rules, match):
  with pytest.raises(ValueError, match=match):
    rules_lib.check_rules(rules)


def test_overrides_replace_single_entries():
  rules = rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["embed=", "heads=tensor,fsdp"])
  table = dict(rules)
  assert table["embed"] is None and table["heads"] == ("tensor", "fsdp")
  assert len(rules) == len(rules_lib.DEFAULT_RULES)
  with pytest.raises(ValueError, match=r"unknown logical name 'embd'"):
    rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["embd=fsdp"])
  with pytest.raises(ValueError, match=r"mesh axis 'gpu' is not one of"):
    rules_lib.with_overrides(rules_lib.DEFAULT_RULES, ["embed=gpu"])
