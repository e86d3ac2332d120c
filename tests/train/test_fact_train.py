"""The FACT recipe (train/fact.py) and FACT in the Stable Diffusion pipeline.

One tiny run (`train/configs/fact_tiny.py`, two variants) makes every output; the tests then
check its files and numbers, the loss against a manual computation, the batches against the
curriculum, and `pipe.generate(face=...)` against the sampler run by hand, at face scale 0, with
a style LoRA at the same time and in the inpainting mode.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxadapt as ja
from jaxadapt import fact as fact_lib
from jaxadapt.context import Tape
from jaxadapt.diffusion import sampling
from jaxadapt.models import unet as unet_lib
from train import fact as recipe
from train import fact_data as data
from train.configs import fact_tiny

VARIANTS = ("plain", "fair")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fact"))
  config = dataclasses.replace(fact_tiny.get_config(), out_dir=out, variants=VARIANTS,
                               report=os.path.join(out, "page", "fact.md"))
  result = recipe.run(config)
  pipe = ja.load_pipeline(os.path.join(out, "base", "pipeline"))
  adapter = fact_lib.load_fact(os.path.join(out, "plain", "adapter"), pipe.unet)
  # Gates moved off zero so that the face matters in the pipeline tests.
  params = jax.tree.map(lambda a: a, adapter.params)
  for p in params["points"].values():
    p["alpha_attn"], p["alpha_ff"] = jnp.float32(0.8), jnp.float32(-0.6)
  adapter = fact_lib.FACTAdapter(adapter.config, params, adapter.encoder)
  return config, result, pipe, adapter


def test_every_output_and_an_honest_page(run):
  config, result, pipe, adapter = run
  out = config.out_dir
  for path in ("base/pipeline/model_index.json", "encoder/config.json", "judge.safetensors",
               "plain/adapter/fact_config.json", "fair/adapter/face_encoder",
               "results.json", "samples.png", "page/fact.md", "page/fact_samples.png"):
    assert os.path.exists(os.path.join(out, path)), path
  saved = json.load(open(os.path.join(out, "results.json")))
  assert set(saved["results"]) == {"train", "held_out"}
  for split, rows in saved["results"].items():
    assert list(rows) == ["base", *VARIANTS]
    assert rows["base"]["background_drift"] == 0.0
    for row in rows.values():
      for key in ("identity_accuracy", "text_accuracy", "pose_copy"):
        assert 0.0 <= row[key] <= 1.0
  assert saved["num_params"]["adapter"] == adapter.num_params
  page = open(os.path.join(out, "page", "fact.md")).read()
  assert "| FACT plain |" in page and "| +FAIR |" in page and "Reading (computed)" in page
  assert "python -m train.fact --config fact_toy" in page
  # The pipeline the recipe exported has a fuser point per transformer block; the adapter fits.
  assert pipe.vae is None and len(pipe.unet.fuser_points) == len(adapter.config.points)


def test_results_recompute_from_the_saved_models(run):
  config, result, pipe, _ = run
  table = recipe.identity_table(config)
  judge = data.FaceJudge.load(os.path.join(config.out_dir, "judge.safetensors"))
  photos = recipe.eval_conditions(config, table)["held_out"]
  trained = fact_lib.load_fact(os.path.join(config.out_dir, "fair", "adapter"))
  base = recipe.generate(pipe, config, photos)
  row = recipe.judge_row(judge, photos, recipe.generate(pipe, config, photos, trained), base)
  assert row == pytest.approx(result.results["held_out"]["fair"])
  # A rerun loads every stage from disk and gives the same table.
  again = recipe.run(dataclasses.replace(config, report=""))
  for split, rows in result.results.items():
    for name, r in rows.items():
      assert again.results[split][name] == pytest.approx(r)


def test_loss_is_ddpm_plus_fair_and_drop_gives_the_null_face(run):
  config, _, pipe, adapter = run
  loss = recipe.FactLoss(pipe.unet.graphdef, adapter.config, recipe._alphas_cumprod(config))
  rng = np.random.default_rng(0)
  b = 3
  batch = {"images": rng.uniform(-1, 1, (b, 3, 16, 16)).astype(np.float32),
           "background": np.array([0, 2, 3]), "masks": np.stack([data.face_mask()] * b),
           "features": rng.standard_normal((b, adapter.config.face_tokens,
                                            adapter.config.face_dim)).astype(np.float32),
           "drop": np.zeros(b, np.float32), "fair": np.full(b, 2.5, np.float32)}
  states = jnp.asarray(rng.standard_normal((5, 8, config.text_dim)), jnp.float32)
  frozen = {"unet": pipe.unet.params, "text": states}
  key = jax.random.key(7)
  total, metrics = jax.jit(loss)(adapter.params, frozen, batch, key)

  # By hand, with the same draws (the loss splits its rng in three: t, eps, drop).
  k_t, k_eps, _ = jax.random.split(key, 3)
  t = jax.random.randint(k_t, (b,), 0, config.num_train_timesteps)
  eps = jax.random.normal(k_eps, (b, 3, 16, 16))
  abar = jnp.asarray(recipe._alphas_cumprod(config))[t][:, None, None, None]
  x_t = jnp.sqrt(abar) * batch["images"] + jnp.sqrt(1 - abar) * eps
  np.testing.assert_allclose(np.asarray(recipe.noised(recipe._alphas_cumprod(config),
                                                      jnp.asarray(batch["images"]), key)[2]),
                             np.asarray(x_t), atol=1e-6)
  tape = Tape()
  ctx = adapter.context(adapter.face_tokens(batch["features"]), 1.0, tape=tape)
  pred = unet_lib.forward(pipe.unet.graphdef, pipe.unet.params, x_t, t.astype(jnp.float32),
                          states[batch["background"]], ctx)
  mse = float(jnp.mean((pred - eps) ** 2))
  fair = float(fact_lib.fair_loss(tape.entries, batch["masks"]))
  assert fair > 0
  np.testing.assert_allclose(float(metrics["mse"]), mse, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["fair"]), fair, rtol=1e-4)
  np.testing.assert_allclose(float(total), mse + 2.5 * fair, rtol=1e-4)
  # Drop probability 1: the loss equals the loss of all-zero features.
  dropped = jax.jit(loss)(adapter.params, frozen, {**batch, "drop": np.ones(b, np.float32)}, key)
  zeros = jax.jit(loss)(adapter.params, frozen,
                        {**batch, "features": np.zeros_like(batch["features"])}, key)
  np.testing.assert_allclose(float(dropped[0]), float(zeros[0]), rtol=1e-6)


def test_batches_follow_the_curriculum(run):
  config, _, _, _ = run
  rng = np.random.default_rng(0)
  photos = {"images": rng.standard_normal((40, 3, 16, 16)).astype(np.float32),
            "background": np.arange(40) % 4, "masks": np.zeros((40, 16, 16), np.float32),
            "identity": np.repeat(np.arange(10), 4),
            "features": np.arange(40, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2))}
  cfg = dataclasses.replace(config, fact_steps=10, fact_batch=20)
  cur = fact_lib.Curriculum.default(shuffle=1.0, drop=0.2, fair=3.0, ramp=0.5)
  batches = recipe.fact_batches(cfg, photos, cur)
  first, late = batches(0), batches(8 * 20)
  own = lambda b: b["features"][:, 0, 0].astype(int)  # noqa: E731  (each row's photo index)
  # Step 0: no shuffle, every condition is the target photo itself (same background).
  np.testing.assert_array_equal(photos["background"][own(first)], first["background"])
  # Past the ramp: every condition is ANOTHER photo of the target's identity.
  targets = [int(np.flatnonzero((photos["images"] == img).all((1, 2, 3)))[0])
             for img in late["images"]]
  assert all(photos["identity"][c] == photos["identity"][t] and c != t
             for c, t in zip(own(late), targets))
  assert set(first["drop"]) == {np.float32(0.2)} and set(late["fair"]) == {np.float32(3.0)}
  assert batches(40)["images"].shape == (20, 3, 16, 16)


def _by_hand(pipe, adapter, prompts, feats, noise, scale, face_scale, steps, ctx=None):
  """The pipeline's sampling written out: CFG over (prompt, face) vs ("", null face)."""
  from jaxadapt.diffusion import images as images_lib
  from jaxadapt.diffusion.schedulers import scheduler_from_config
  cond = pipe.encode_prompt(prompts)
  uncond = pipe.encode_prompt([""] * len(prompts))
  face = adapter.face_tokens(feats)
  null = fact_lib.null_face_tokens(adapter.params, len(prompts))

  def denoise(x, t, c):
    ctx2 = adapter.context(c["f"], face_scale, base=ctx)
    return unet_lib.forward(pipe.unet.graphdef, pipe.unet.params, x, t, c["c"], ctx2)

  sched = scheduler_from_config(pipe.scheduler_config)
  z = sampling.sample(denoise, sched, jnp.asarray(noise), {"c": cond, "f": face},
                      {"c": uncond, "f": null}, jnp.full((len(prompts),), scale), steps,
                      jax.random.key(0), progress=False)
  return np.asarray(images_lib.to_uint8(z))


def test_generate_with_a_face(run):
  config, _, pipe, adapter = run
  rng = np.random.default_rng(1)
  photos = data.make_photos(data.HELD_OUT_IDS[:2], 1, 5)
  crops = data.condition_crop(photos["images"])
  feats = np.asarray(adapter.encoder(crops))
  noise = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  prompts = [data.prompt("red"), data.prompt("blue")]
  kw = dict(prompt=prompts, latents=noise, num_steps=3, guidance_scale=2.0, progress=False)
  got = pipe.generate(fact=adapter, face=feats, face_scale=0.7, **kw)
  want = _by_hand(pipe, adapter, prompts, feats, noise, 2.0, 0.7, 3)
  assert np.abs(got.astype(int) - want).max() <= 1
  base = pipe.generate(**kw)
  assert np.abs(got.astype(int) - base).max() > 10  # the face matters
  # Face images go through the adapter's encoder: the same as their features.
  np.testing.assert_array_equal(pipe.generate(fact=adapter, face=crops, face_scale=0.7, **kw),
                                got)
  # Scale 0 is the base exactly.
  np.testing.assert_array_equal(pipe.generate(fact=adapter, face=feats, face_scale=0.0, **kw),
                                base)
  with pytest.raises(ValueError, match="both fact= .* and face="):
    pipe.generate(face=feats, **kw)
  with pytest.raises(ValueError, match="3 faces for 2 prompts"):
    pipe.generate(fact=adapter, face=np.concatenate([feats, feats[:1]]), **kw)
  with pytest.raises(ValueError, match="face_scale must be"):
    pipe.generate(fact=adapter, face=feats, face_scale=[1.0, 2.0, 3.0], **kw)


def test_face_with_a_style_lora_and_inpainting(run):
  config, _, pipe, adapter = run
  rng = np.random.default_rng(2)
  photos = data.make_photos(data.TRAIN_IDS[:2], 1, 6)
  feats = np.asarray(adapter.encoder(data.condition_crop(photos["images"])))
  noise = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  prompts = [data.prompt("green"), data.prompt("yellow")]
  kw = dict(prompt=prompts, latents=noise, num_steps=3, guidance_scale=2.0, progress=False)
  # A style LoRA on every U-Net linear layer at the same time as the face adapter.
  lora = ja.init_lora(pipe.unet, ja.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
  lora = dataclasses.replace(lora, weights={
      p: {**w, "b": jnp.asarray(rng.standard_normal(w["b"].shape) * 0.3, jnp.float32)}
      for p, w in lora.weights.items()})
  got = pipe.generate(adapter=lora, fact=adapter, face=feats, **kw)
  want = _by_hand(pipe, adapter, prompts, feats, noise, 2.0, 1.0, 3,
                  ctx=pipe.unet.make_context(adapter=lora))
  assert np.abs(got.astype(int) - want).max() <= 1
  assert np.abs(got.astype(int) - pipe.generate(fact=adapter, face=feats, **kw)).max() > 10
  # Inpainting limited to the face: every pixel outside the face box is the input photo's.
  mask = np.stack([data.face_mask()] * 2)
  painted = pipe.generate(fact=adapter, face=feats, image=photos["images"], mask_image=mask,
                          **kw)
  kept = np.round(255 * np.clip(photos["images"].transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1))
  outside = mask == 0
  np.testing.assert_array_equal(painted[outside], kept[outside].astype(np.uint8))
  assert np.abs(painted[~outside].astype(int) - kept[~outside]).max() > 10


def test_the_notebook_runs_on_this_run(run):
  """colab/fact.ipynb top to bottom (its cells assert their own results), with FACT_RUN set to
  this module's run so that it evaluates the trained stages instead of training them again.
  Last in the module: the notebook rewrites the run's results.json."""
  from _notebooks import ROOT, execute, kernel_env
  config = run[0]
  cwd = os.path.join(config.out_dir, "notebook")
  os.makedirs(cwd)
  # One CPU device as on a laptop; otherwise the suite's XLA flags (tests/conftest.py: compiles
  # dominate here).
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  assert not execute(ROOT / "colab" / "fact.ipynb", cwd,
                     kernel_env(XLA_FLAGS=flags, FACT_RUN=config.out_dir))
  for png in ("identities.png", "portraits.png", "face_scale.png", "inpaint.png"):
    assert os.path.exists(os.path.join(cwd, "fact_work", png)), png
