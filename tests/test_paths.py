"""jaxadapt.paths: dotted paths of pure-dict parameter trees, against jax's own key paths."""
import jax
import numpy as np
import pytest

from jaxadapt import paths


def _tree():
  """The shape of an `nnx.to_pure_dict` tree: str keys, int keys for `nnx.List` entries."""
  layer = lambda i: {"self_attn": {"q_proj": {"kernel": np.full((2, 3), i, np.float32)}},
                     "input_layernorm": {"weight": np.ones(2, np.float32)}}
  return {"model": {"embed_tokens": {"embedding": np.zeros((5, 2), np.float32)},
                    "layers": {0: layer(0), 1: layer(1)}},
          "lm_head": {"kernel": np.zeros((2, 5), np.float32)}}


def test_paths_name_every_leaf_and_walk_back_to_it():
  tree = _tree()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [paths.keypath_str(kp) for kp, _ in flat]
  assert "model.layers.1.self_attn.q_proj.kernel" in names and len(set(names)) == len(flat)
  for name, (_, leaf) in zip(names, flat):
    stem, last = name.rsplit(".", 1)
    assert paths.path_get(tree, stem)[last] is leaf
  mapped = paths.map_with_paths(lambda p, x: p, tree)
  assert mapped["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"] == (
      "model.layers.0.self_attn.q_proj.kernel")
  mods = paths.module_paths(tree)
  assert mods[0] == "" and "model.layers.0.self_attn.q_proj" in mods and "lm_head" in mods


def test_path_set_is_pure_and_shares_other_nodes():
  tree = _tree()
  new = paths.path_set(tree, "model.layers.1.self_attn.q_proj", "kernel", "x")
  assert new["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"] == "x"
  assert tree["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"].shape == (2, 3)
  assert new["model"]["layers"][0] is tree["model"]["layers"][0]
  assert new["lm_head"] is tree["lm_head"]


def test_path_get_names_the_missing_part():
  tree = _tree()
  with pytest.raises(KeyError, match=r"no parameter at 'model.layers.2.mlp' \(missing '2'\)"):
    paths.path_get(tree, "model.layers.2.mlp")
  with pytest.raises(KeyError, match=r"missing 'bias'"):
    paths.path_get(tree, "lm_head.kernel.bias")
