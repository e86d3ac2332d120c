"""Target resolution, rank and scaling per module against PEFT's `get_peft_model` (the reference).

Each case builds the PEFT model on a tiny Llama and lists which modules got LoRA with their rank
and scaling; `ja.init_lora` with the same options must give exactly the same table, or (for what
jaxadapt does not support, or PEFT itself refuses) raise an error naming the option.
"""
import copy
import warnings

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import jaxadapt as ja

_PREFIX = "base_model.model."

AGREE = {
    "suffix": dict(target_modules=["q_proj"]),
    "full_name": dict(target_modules=["model.layers.0.self_attn.q_proj"]),
    "regex": dict(target_modules=r".*\.(k|o|up)_proj"),
    "regex_full_path": dict(target_modules=r"model\.layers\.1\..*_proj"),
    "list_mixed": dict(target_modules=["model.layers.1.mlp.up_proj", "v_proj"]),
    "list_entry_is_literal": dict(target_modules=[r".*q_proj", "v_proj"]),
    "suffix_of_a_name": dict(target_modules=["proj", "o_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "all_linear_any_case": dict(target_modules="ALL-Linear"),
    "exclude_list": dict(target_modules="all-linear",
                         exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]),
    "exclude_regex": dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*"),
    "layers_int": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
    "layers_list": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 1]),
    "layers_empty": dict(target_modules=["q_proj"], layers_to_transform=[]),
    "layers_pattern": dict(target_modules=["q_proj"], layers_to_transform=[1],
                           layers_pattern="layers"),
    "layers_pattern_list": dict(target_modules=["q_proj"], layers_to_transform=[1],
                                layers_pattern=["h", "layers"]),
    # A full name is taken whatever layers_to_transform says; suffixes are filtered.
    "layers_with_full_name": dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
                                  layers_to_transform=[1]),
    "rank_alpha_suffix": dict(target_modules="all-linear", rank_pattern={"q_proj": 5},
                              alpha_pattern={"proj": 2}),
    # Several keys match: the first in the mapping's order wins.
    "rank_first_key_wins": dict(target_modules="all-linear",
                                rank_pattern={r"layers\.0\..*": 5, "q_proj": 7}),
    "rank_first_key_wins_swapped": dict(target_modules="all-linear",
                                        rank_pattern={"q_proj": 7, r"layers\.0\..*": 5}),
    "rank_full_name": dict(target_modules="all-linear",
                           rank_pattern={"model.layers.1.self_attn.q_proj": 6}),
    "rank_partial_component": dict(target_modules="all-linear", rank_pattern={"_proj": 6}),
    "rank_anchored": dict(target_modules="all-linear", rank_pattern={"^model.*q_proj": 6}),
    "rslora_patterns": dict(target_modules="all-linear", use_rslora=True, lora_alpha=7,
                            rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 9}),
    "lm_head": dict(target_modules=["lm_head", "q_proj"]),
}


def _peft_table(base, options):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**{"r": 3, **options}))
  return {name[len(_PREFIX):]: (m.r["default"], pytest.approx(m.scaling["default"], rel=1e-6))
          for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.r}


def _ja_table(model, options):
  adapter = ja.init_lora(model, ja.LoraConfig(**{"r": 3, **options}))
  return {p: (adapter.rank(p), adapter.scale(p)) for p in adapter.weights}


@pytest.fixture(scope="module")
def llama(llama_dir):
  directory, base = llama_dir
  return ja.load_model(directory), base


@pytest.mark.parametrize("case", list(AGREE))
def test_targets_rank_and_scale_equal_peft(case, llama):
  model, base = llama
  want = _peft_table(base, AGREE[case])
  assert want  # PEFT adapted something: the comparison is not vacuous
  assert _ja_table(model, AGREE[case]) == want
  # The config alone (as FrozenModel.check_adapter uses it) resolves to the same paths.
  config = ja.LoraConfig(**{"r": 3, **AGREE[case]})
  assert set(config.targets(model.linear_paths)) == set(want)


def test_all_linear_skips_a_tied_output_head(tmp_path, hf_model_maker):
  base = hf_model_maker("qwen2", str(tmp_path), seed=2, tie_word_embeddings=True)
  model = ja.load_model(str(tmp_path))
  want = _peft_table(base, dict(target_modules="all-linear"))
  assert "lm_head" not in want and len(want) == 14
  assert _ja_table(model, dict(target_modules="all-linear")) == want


REFUSED = {
    # PEFT's LoraConfig refuses these; so does jaxadapt's.
    "layers_with_regex": (dict(target_modules=r".*q_proj", layers_to_transform=[0]), ValueError,
                          "layers_to_transform cannot be used when target_modules is a str"),
    "layers_with_all_linear": (dict(target_modules="all-linear", layers_to_transform=0),
                               ValueError, "layers_to_transform cannot be used"),
    "layers_pattern_with_regex": (dict(target_modules=r".*q_proj", layers_to_transform=None,
                                       layers_pattern="layers"), ValueError,
                                  "layers_pattern cannot be used"),
    "layers_pattern_alone": (dict(target_modules=["q_proj"], layers_pattern="layers"), ValueError,
                             "layers_pattern needs layers_to_transform"),
    # PEFT raises at layer creation; jaxadapt divided by zero.
    "rank_pattern_zero": (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 0}), ValueError,
                          r"rank_pattern\['q_proj'\] must be a positive int"),
    # PEFT refuses a container module (LlamaMLP); jaxadapt used to skip it silently.
    "container_module": (dict(target_modules=["mlp", "q_proj"]), NotImplementedError,
                         r"target_modules=\('mlp', 'q_proj'\) matches \['model.layers.0.mlp'"),
    "regex_matching_everything": (dict(target_modules=r".*"), NotImplementedError,
                                  r"target_modules='\.\*' matches \['model'"),
    "nothing_matches": (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), ValueError,
                        "matches no linear layer"),
    "regex_matching_no_full_path": (dict(target_modules=r"q_proj"), ValueError,
                                    "target_modules='q_proj'.*matches no linear layer"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_like_peft(case, llama):
  model, base = llama
  options, error, message = REFUSED[case]
  with pytest.raises(ValueError):
    _peft_table(base, options)
  with pytest.raises(error, match=message):
    ja.init_lora(model, ja.LoraConfig(**{"r": 3, **options}))


def test_embedding_and_tied_head_targets_equal_peft(llama, tmp_path, hf_model_maker):
  """PEFT puts LoRA on `embed_tokens` and on a tied `lm_head`; so does jaxadapt (the model
  declares them: `extra_lora_paths`), with the same ranks and scales."""
  import jax
  from jaxadapt.adapters import lora as lora_lib

  def table(model, options):
    adapter = lora_lib.init_lora(model.params, model.linear_paths,
                                 ja.LoraConfig(**{"r": 3, **options}), jax.random.key(0),
                                 extra_paths=model.extra_lora_paths)
    return {p: (adapter.rank(p), adapter.scale(p)) for p in adapter.weights}

  model, base = llama
  options = dict(target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 2})
  assert "model.embed_tokens" in _peft_table(base, options)
  assert table(model, options) == _peft_table(base, options)
  tied_base = hf_model_maker("llama", str(tmp_path), seed=2, tie_word_embeddings=True)
  tied = ja.load_model(str(tmp_path))
  assert tied.extra_lora_paths == ["model.embed_tokens", "lm_head"]
  options = dict(target_modules=["embed_tokens", "lm_head", "v_proj"], lora_alpha=6)
  assert {"lm_head", "model.embed_tokens"} <= set(_peft_table(tied_base, options))
  assert table(tied, options) == _peft_table(tied_base, options)


@pytest.mark.parametrize("option,value", [("target_parameters", ["mlp.up_proj.weight"]),
                                          ("modules_to_save", ["lm_head"])])
def test_unsupported_options_are_named(option, value, llama):
  """PEFT accepts these (LoRA on a raw parameter; a fully trained copy); jaxadapt has neither."""
  _, base = llama
  assert _peft_table(base, {"target_modules": ["q_proj"], option: value})
  with pytest.raises(TypeError, match=option):
    ja.LoraConfig(target_modules=["q_proj"], **{option: value})
