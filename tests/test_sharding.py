"""Loading onto a mesh: each tensor lands on its partition rule; sharded forward == one device."""
import jax
import numpy as np
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxadapt as ja
from jaxadapt import sharding as sharding_lib


def test_load_onto_mesh_places_each_tensor_and_matches(llama_dir):
  directory, ref_model = llama_dir
  assert jax.device_count() == 8
  mesh = sharding_lib.make_mesh(data=4, model=2)
  model = ja.load_model(directory, sharding=mesh)
  layer = model.params["model"]["layers"][0]
  assert layer["self_attn"]["q_proj"]["kernel"].sharding == NamedSharding(mesh, P(None, "model"))
  assert layer["self_attn"]["o_proj"]["kernel"].sharding == NamedSharding(mesh, P("model", None))
  assert layer["mlp"]["down_proj"]["kernel"].sharding == NamedSharding(mesh, P("model", None))
  assert layer["input_layernorm"]["weight"].sharding == NamedSharding(mesh, P())
  q = layer["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}
  ids = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = ref_model(ids).logits.numpy()
  batch = jax.device_put(ids.numpy(), NamedSharding(mesh, P("data", None)))
  np.testing.assert_allclose(np.asarray(model(batch)), ref, atol=1e-4, rtol=0)


def test_custom_sharding_callable_sees_every_param(llama_dir):
  seen = []
  dev = jax.devices()[3]

  def place(path, shape):
    seen.append(path)
    return jax.sharding.SingleDeviceSharding(dev)
  model = ja.load_model(llama_dir[0], sharding=place)
  assert "model.layers.1.mlp.up_proj.kernel" in seen and "lm_head.kernel" in seen
  assert all(x.devices() == {dev} for x in jax.tree.leaves(model.params))
