"""AGD on a Stable Diffusion pipeline (the paper's U-Net setting): prompt-conditioned CFG
trajectories against direct CFG with the pipeline's own text states, a cross-attention adapter
trained on them, and `generate(prompt, guidance="agd")` as one U-Net pass per step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import agd as agd_lib
from jaxadapt import sharding as sharding_lib
from train import agd as train_agd


def test_sd_trajectories_training_and_generation(sd, tmp_path):
  _, _, pipe = sd
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a cat\n\na red dog\n")
  config = train_agd.AGDTrainConfig(
      pipeline="unused", prompts=str(prompts), out_dir=str(tmp_path / "run"),
      kinds=("cross_attention",), default_kind="cross_attention", ablation=False, hidden=8,
      heads=2, fourier_features=8, num_steps=2, num_trajectories=4, shard_size=4,
      collect_batch=4, steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
      progress=False)
  data = str(tmp_path / "run" / "trajectories")
  train_agd.collect(pipe, data, train_agd.train_spec(config), batch=4, progress=False)
  source = train_agd.TrajectoryShards(data)
  arr = source.arrays()
  states = np.asarray(pipe.encode_prompt(["a cat", "a red dog", ""]))
  np.testing.assert_allclose(np.asarray(source.conditions), states, atol=1e-6)
  x, t = jnp.asarray(arr["x"]), jnp.asarray(arr["t"])
  w = arr["w"][:, None, None, None]
  eps_c = np.asarray(pipe.unet(x, t, states[arr["cond"]]))
  eps_u = np.asarray(pipe.unet(x, t, np.broadcast_to(states[2], (len(x),) + states.shape[1:])))
  np.testing.assert_allclose(arr["eps_cfg"], eps_u + w * (eps_c - eps_u), atol=2e-5)
  np.testing.assert_array_equal(source[3]["cond"], states[arr["cond"][3]])  # the record's states

  adapter, fit = train_agd.train_adapter(config, pipe, "cross_attention", data,
                                         sharding_lib.make_mesh(1, 1, devices=jax.devices()[:1]))
  assert len(fit.losses) == 2 and adapter.config.context_tokens == states.shape[1]
  assert all(p.endswith("attn2") for p in adapter.config.points)
  moved = jax.tree.map(lambda a: a + 0.1, agd_lib.trainable_part(adapter.params))
  adapter = dataclasses.replace(adapter, params=agd_lib.with_trainable(adapter.params, moved))

  noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
  kw = dict(num_steps=3, latents=noise, progress=False, scheduler="ddim")
  got = pipe.generate("a cat", guidance_scale=3.0, guidance="agd", agd=adapter, **kw)
  from jaxadapt.diffusion import sampling
  from jaxadapt.diffusion.pipeline import _agd_denoise, _resolve_scheduler
  fn = jax.tree_util.Partial(_agd_denoise, pipe.unet.graphdef, pipe.unet.params, None,
                             adapter.inserts())
  z = sampling.sample(fn, _resolve_scheduler("ddim", pipe.scheduler_config), jnp.asarray(noise),
                      {"c": jnp.asarray(states[:1]), "w": jnp.array([3.0])}, None, None, 3, None)
  from jaxadapt.diffusion.images import to_uint8
  np.testing.assert_array_equal(got, to_uint8(pipe.vae.decode(z / pipe.vae.config.scaling_factor)))
