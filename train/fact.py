"""FaceChain-FACT reproduction: a face adapter with decoupled training on synthetic faces.

  python -m train.fact --config fact_toy [--out_dir runs/fact_toy] [--report docs/fact.md]

Yu et al. 2024 ("FaceChain-FACT: Face Adapter with Decoupled Training for Identity-preserved
Personalization") train a face adapter on a frozen text-to-image model and decouple what it
learns from the rest: FAIR keeps the adapter's effect inside the face, the condition shuffle
stops it copying pose from the condition photo, a curriculum schedules them. Every stage here
runs on CPU from nothing but this repo (`train/fact_data.py`'s 16x16 synthetic faces):

1. The base: a small text-conditioned pixel-space U-Net (`jaxadapt.models.unet`, every
   parameter trained on the shared trainer) on fresh renders of the BASE identities (a pool no
   adapter sees), the prompt naming the background ("a face on a red background"), through a
   frozen random CLIP text encoder; 10% empty prompts so CFG works. Exported as a diffusers
   `StableDiffusionPipeline` folder without VAE (`out_dir/base/pipeline`), which
   `ja.load_pipeline` loads.
2. The face encoder: a TransFace-style ViT (`jaxadapt.models.face_vit`, 12x12 crops, patch 3 ->
   16 tokens) trained as an identity classifier on the base identities' condition crops, then
   frozen, as TransFace is trained on other people's faces.
3. The judge (`train.fact_data.train_judge`): identity, pose and background classifiers.
4. FACT adapters (`jaxadapt.fact`) on the frozen base, trained on a fixed photo set of the TRAIN
   identities, one run per variant (`VARIANTS`): plain, +FAIR, +shuffle, +both, +both with the
   curriculum. The loss is DDPM's epsilon loss plus lambda * FAIR (`FactLoss`); the drop, shuffle
   and FAIR weight of each step come from the variant's `Curriculum`.
5. Evaluation: for train and held-out identities, condition photos with a random background;
   each is generated (the same noise for every model) with a prompt naming ANOTHER background,
   so a leak of the condition's surroundings shows. Judged: identity accuracy of the face,
   background drift against the base from the same noise (RMS outside the face box), text
   accuracy of the background, and the pose-copy rate (the generated pose equals the condition
   photo's; chance is 1/3).

Outputs in `out_dir`: `results.json`, `samples.png` (a grid), per-stage dirs; `--report PATH`
writes the page (docs/fact.md). Each stage is skipped when its output exists (a rerun resumes;
the trainer resumes a killed stage from its checkpoint).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadapt import fact as fact_lib
from jaxadapt.context import Tape
from jaxadapt.diffusion import schedules
from jaxadapt.models import face_vit
from jaxadapt.models import unet as unet_lib
from jaxadapt.models.clip import CLIPTextConfig, CLIPTextEncoder
from train import fact_data as data
from train import flags
from train import loop

VARIANTS = {  # name: (FAIR on, shuffle on, curriculum on)
    "plain": (False, False, False),
    "fair": (True, False, False),
    "shuffle": (False, True, False),
    "both": (True, True, False),
    "both_curriculum": (True, True, True),
}
WORDS = ("a", "face", "on", "background") + data.BACKGROUNDS
EMPTY = len(data.BACKGROUNDS)   # row of the empty prompt in the text-state table
PROMPTS = [data.prompt(b) for b in data.BACKGROUNDS] + [""]  # the text-state table's rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactToyConfig:
  """The reproduction's settings (train/configs/fact_toy.py: what each one was chosen from)."""
  out_dir: str = "runs/fact_toy"   # every stage's outputs
  seed: int = 0                    # every draw
  base_identities: int = 48        # identities only the base and the encoder see
  per_identity: int = 24           # training photos per train identity (the adapter's set)
  # base U-Net (pixel space, 16x16x3) and its text encoder
  channels: tuple = (32, 64, 64)   # block_out_channels (first level without attention)
  heads: tuple = (2, 4, 4)         # attention heads per level
  text_dim: int = 32               # CLIP width = cross-attention width
  base_steps: int = 1000
  base_batch: int = 32
  base_lr: float = 2e-3
  text_dropout: float = 0.1        # empty prompt share (for classifier-free guidance)
  # face encoder (TransFace-style ViT)
  encoder_dim: int = 32
  encoder_depth: int = 2
  encoder_heads: int = 4
  encoder_steps: int = 300
  # FACT
  num_tokens: int = 8              # face tokens after the projector
  fact_steps: int = 500
  fact_batch: int = 16
  fact_lr: float = 3e-3
  drop: float = 0.1                # face-condition drop probability (every variant)
  fair: float = 1.0                # FAIR weight lambda when on
  shuffle: float = 0.5             # shuffle probability when on
  ramp: float = 0.5                # curriculum: shuffle ramps 0 -> `shuffle` over this fraction
  variants: tuple = tuple(VARIANTS)
  # judge and evaluation
  judge_steps: int = 300
  eval_per_identity: int = 4       # condition photos per identity (train and held-out)
  eval_steps: int = 20             # DDIM steps
  guidance_scale: float = 2.0      # CFG on text + face (the uncond branch: empty prompt, no face)
  face_scale: float = 1.0
  # run
  num_train_timesteps: int = 1000
  checkpoint_every: int = 500
  log_every: int = 25
  progress: bool = True
  data_parallel: int = 1
  report: str = ""                 # write the page here (e.g. docs/fact.md)

  def __post_init__(self):
    loop.check_numbers(self, positive_ints=(
        "base_identities", "per_identity", "text_dim", "base_steps", "base_batch",
        "encoder_dim", "encoder_depth", "encoder_heads", "encoder_steps", "num_tokens",
        "fact_steps", "fact_batch", "judge_steps", "eval_per_identity", "eval_steps",
        "checkpoint_every", "log_every", "data_parallel", "num_train_timesteps"),
        ints=("seed",), finite=("base_lr", "fact_lr", "drop", "fair", "shuffle", "ramp",
                                "guidance_scale", "face_scale", "text_dropout"))
    unknown = [v for v in self.variants if v not in VARIANTS]
    if unknown or not self.variants:
      raise ValueError(f"variants must be among {list(VARIANTS)}, got {list(self.variants)}")
    if len(self.channels) != len(self.heads) or len(self.channels) < 2:
      raise ValueError(f"channels and heads need one entry per U-Net level (>= 2); got "
                       f"{self.channels} and {self.heads}")
    for name in ("drop", "shuffle", "text_dropout", "ramp"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.base_identities + data.NUM_IDENTITIES > 87:
      raise ValueError(f"at most {87 - data.NUM_IDENTITIES} base identities fit the palette "
                       f"(pairwise 2 quadrants apart), got {self.base_identities}")

  def to_record(self) -> dict:
    return dataclasses.asdict(self)

  def curriculum(self, variant: str) -> fact_lib.Curriculum:
    fair_on, shuffle_on, curriculum_on = VARIANTS[variant]
    fair, shuffle = (self.fair if fair_on else 0.0), (self.shuffle if shuffle_on else 0.0)
    if curriculum_on:
      return fact_lib.Curriculum.default(shuffle=shuffle, drop=self.drop, fair=fair,
                                         ramp=self.ramp)
    return fact_lib.Curriculum.constant(shuffle=shuffle, drop=self.drop, fair=fair)

  def unet_config(self) -> unet_lib.UNetConfig:
    n = len(self.channels)
    return unet_lib.UNetConfig(
        sample_size=data.SIZE, in_channels=3, out_channels=3, block_out_channels=self.channels,
        layers_per_block=(1,) * n, norm_num_groups=8, cross_attention_dim=(self.text_dim,) * n,
        attention_head_dim=self.heads, transformer_layers_per_block=(1,) * n,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))

  def encoder_config(self) -> face_vit.FaceViTConfig:
    crop = data.CROP[1] - data.CROP[0]
    return face_vit.FaceViTConfig(img_size=crop, patch_size=3, embed_dim=self.encoder_dim,
                                  depth=self.encoder_depth, num_heads=self.encoder_heads,
                                  num_features=0)

  def scheduler_config(self) -> dict:
    """DDIM on DDPM's linear betas, trailing spacing (starts at t = T - 1, where training noise
    is), no x0 clipping (as train/digits.py: clipping fought guidance)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": self.num_train_timesteps,
            "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "trained_betas": None, "clip_sample": False, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
            "thresholding": False, "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": False}


def identity_table(config: FactToyConfig) -> np.ndarray:
  """Identity patterns: rows 0..23 the judge's identities (`data.identity_patterns()`, the
  greedy draw's prefix), then the base pool."""
  table = data.make_identities(data.NUM_IDENTITIES + config.base_identities, data.IDENTITY_SEED)
  assert np.array_equal(table[:data.NUM_IDENTITIES], data.identity_patterns())
  return table


def base_ids(config: FactToyConfig) -> np.ndarray:
  return np.arange(data.NUM_IDENTITIES, data.NUM_IDENTITIES + config.base_identities)


def _random_photos(table, ids, rng: np.random.Generator, n: int) -> dict:
  """n fresh photos of identities drawn from `ids`, every attribute random."""
  ident = ids[rng.integers(0, len(ids), n)]
  pose, expr, bg = (rng.integers(0, k, n) for k in (len(data.POSES), len(data.EXPRESSIONS),
                                                   len(data.BACKGROUNDS)))
  bright = rng.uniform(-data.BRIGHTNESS_JITTER, data.BRIGHTNESS_JITTER, n)
  return {"images": data.render(table[ident], pose, expr, bg, bright, rng=rng),
          "identity": ident.astype(np.int32), "background": bg.astype(np.int32)}


# --- text ----------------------------------------------------------------------------------------

def text_encoder(config: FactToyConfig) -> CLIPTextEncoder:
  """The frozen random CLIP text encoder (the toy's "pretrained" text model: its states tell the
  four prompts apart, which is all the base needs)."""
  from jaxadapt.io.diffusers_save import CLIP_EOS_ID, clip_vocab
  cfg = CLIPTextConfig(vocab_size=len(clip_vocab(WORDS)), hidden_size=config.text_dim,
                       intermediate_size=2 * config.text_dim, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8,
                       eos_token_id=CLIP_EOS_ID)
  return CLIPTextEncoder.random(cfg, seed=config.seed)


def text_states(encoder: CLIPTextEncoder, directory: str) -> np.ndarray:
  """[5, L, D]: the states of the four background prompts, then of the empty prompt, as the
  pipeline encodes them (the tokenizer written to `directory`)."""
  from transformers import CLIPTokenizer
  from jaxadapt.io.diffusers_save import write_clip_tokenizer
  write_clip_tokenizer(WORDS, directory, max_length=encoder.config.max_position_embeddings)
  tok = CLIPTokenizer.from_pretrained(directory)
  ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="np")["input_ids"]
  return np.asarray(encoder.prompt_embeds(np.asarray(ids, np.int32)), np.float32)


# --- 1. the base -----------------------------------------------------------------------------------

def noised(alphas_cumprod: tuple, x0: jax.Array, rng: jax.Array):
  """DDPM's forward noising (Ho et al. 2020 Eq. 4): t ~ U{0..T-1}, eps ~ N(0, I),
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Returns (t, eps, x_t, a key for the caller)."""
  k_t, k_eps, k_rest = jax.random.split(rng, 3)
  abar_table = jnp.asarray(alphas_cumprod, jnp.float32)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, abar_table.shape[0])
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  abar = abar_table[t][:, None, None, None]
  return t, eps, jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps, k_rest


@dataclasses.dataclass(frozen=True)
class TextDDPMLoss:
  """DDPM's simple loss (Ho et al. 2020 Eq. 14) for a text-conditioned U-Net, the prompt
  replaced by the empty one with probability `text_dropout` (Ho & Salimans 2022 Alg. 1)."""
  graphdef: Any
  alphas_cumprod: tuple
  text_dropout: float

  def __call__(self, trainable, frozen_tree, batch, rng):
    x0, bg = batch["images"], batch["background"]
    t, eps, x_t, k_drop = noised(self.alphas_cumprod, x0, rng)
    row = jnp.where(jax.random.bernoulli(k_drop, self.text_dropout, bg.shape), EMPTY, bg)
    pred = unet_lib.forward(self.graphdef, trainable, x_t, t.astype(jnp.float32),
                            frozen_tree["text"][row])
    return jnp.mean((pred - eps) ** 2)


def _alphas_cumprod(config: FactToyConfig) -> tuple:
  sc = config.scheduler_config()
  return tuple(float(a) for a in schedules.alphas_cumprod(schedules.make_betas(
      num_train_timesteps=sc["num_train_timesteps"], beta_start=sc["beta_start"],
      beta_end=sc["beta_end"], beta_schedule="linear", trained_betas=None,
      rescale_betas_zero_snr=False)))


def train_base(config: FactToyConfig, table, mesh):
  """Trains (or resumes, or loads) the base U-Net; returns the pipeline dir."""
  from jaxadapt.io.diffusers_save import save_sd_pipeline
  out = os.path.join(config.out_dir, "base")
  pipeline_dir = os.path.join(out, "pipeline")
  if os.path.exists(os.path.join(pipeline_dir, "model_index.json")):
    return pipeline_dir
  text = text_encoder(config)
  states = text_states(text, os.path.join(out, "tokenizer"))
  model = unet_lib.UNet.random(config.unet_config(), seed=config.seed)
  ids = base_ids(config)

  def batches(position):
    return _random_photos(table, ids, np.random.default_rng([config.seed, 1, position]),
                          config.base_batch)

  tx = loop.AdamW(learning_rate=config.base_lr, steps=config.base_steps,
                  warmup_steps=min(100, config.base_steps), final_lr_fraction=0.05,
                  weight_decay=0.0)
  record = {"config": {k: v for k, v in config.to_record().items()
                       if k in ("seed", "base_identities", "channels", "heads", "text_dim",
                                "base_steps", "base_batch", "base_lr", "text_dropout")}}
  loss = TextDDPMLoss(model.graphdef, _alphas_cumprod(config), config.text_dropout)
  with loop.Trainer(out, steps=config.base_steps, checkpoint_every=config.checkpoint_every,
                    log_every=config.log_every, progress=config.progress,
                    desc="FACT base U-Net") as trainer:
    fit = trainer.fit(loss, tx, model.params, {"text": jnp.asarray(states)}, batches,
                      mesh=mesh, batch_size=config.base_batch, seed=config.seed, record=record,
                      learning_rate=tx.schedule)
  trained = unet_lib.UNet(model.config, model.graphdef, jax.device_get(fit.trainable))
  save_sd_pipeline(pipeline_dir, unet=trained, text_encoder=text, tokenizer_words=WORDS,
                   scheduler_config=config.scheduler_config())
  return pipeline_dir


# --- 2. the face encoder ---------------------------------------------------------------------------

def train_encoder(config: FactToyConfig, table) -> face_vit.FaceEncoder:
  """A TransFace-style ViT trained as an identity classifier (mean token -> linear, softmax
  cross-entropy, Adam) on condition crops of the base identities, then frozen; saved to
  `out_dir/encoder` and loaded from there on a rerun."""
  out = os.path.join(config.out_dir, "encoder")
  if os.path.exists(os.path.join(out, "config.json")):
    return face_vit.load_face_encoder(out)
  enc = face_vit.FaceEncoder.random(config.encoder_config(), seed=config.seed)
  ids = base_ids(config)
  head = {"w": jnp.zeros((config.encoder_dim, len(ids))), "b": jnp.zeros((len(ids),))}
  params = {"vit": enc.params, "head": head}
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, config.encoder_steps))
  state = tx.init(params)

  @jax.jit
  def step(params, state, crops, labels):
    def loss_fn(p):
      tokens = face_vit.forward(enc.graphdef, p["vit"], crops)
      logits = tokens.mean(1) @ p["head"]["w"] + p["head"]["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng([config.seed, 2])
  lookup = {int(k): i for i, k in enumerate(ids)}
  from tqdm.auto import tqdm
  for _ in tqdm(range(config.encoder_steps), desc="face encoder", disable=not config.progress):
    photos = _random_photos(table, ids, rng, 64)
    crops = data.condition_crop(data.augment(photos["images"], rng))
    labels = np.asarray([lookup[int(i)] for i in photos["identity"]], np.int32)
    params, state, loss = step(params, state, crops, labels)
  enc = face_vit.FaceEncoder(enc.config, enc.graphdef, jax.device_get(params["vit"]))
  face_vit.save_face_encoder(enc, out)
  return enc


# --- 4. FACT ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FactLoss:
  """DDPM's epsilon loss of the U-Net with the face adapter, plus lambda * FAIR (FACT Sec. 3):
  `||eps - eps_theta(x_t, t, text, face)||^2 + lambda * fair_loss(increments, face mask)`.

  The batch carries this step's curriculum values (`drop`, `fair`: one per row, all equal); the
  face features are dropped here (`fact.condition_drop`) from the step's rng.
  """
  graphdef: Any
  fact_config: fact_lib.FACTConfig
  alphas_cumprod: tuple

  def __call__(self, trainable, frozen_tree, batch, rng):
    t, eps, x_t, k_drop = noised(self.alphas_cumprod, batch["images"], rng)
    feats = fact_lib.condition_drop(batch["features"], k_drop, batch["drop"][0])
    tape = Tape()
    ctx = fact_lib.context(self.fact_config, trainable, fact_lib.project(trainable, feats),
                           1.0, tape=tape)
    pred = unet_lib.forward(self.graphdef, frozen_tree["unet"], x_t, t.astype(jnp.float32),
                            frozen_tree["text"][batch["background"]], ctx)
    mse = jnp.mean((pred - eps) ** 2)
    fair = fact_lib.fair_loss(tape.entries, batch["masks"])
    return mse + batch["fair"][0] * fair, {"mse": mse, "fair": fair}


def training_photos(config: FactToyConfig, table, encoder) -> dict:
  """The adapter's fixed photo set (train identities) and its encoder features."""
  photos = data.make_photos(data.TRAIN_IDS, config.per_identity, config.seed + 3,
                            patterns=table)
  photos["features"] = np.asarray(encoder(data.condition_crop(photos["images"])), np.float32)
  return photos


def fact_batches(config: FactToyConfig, photos: dict, curriculum: fact_lib.Curriculum):
  """`batches(position)`: epoch-wise permutations of the photo set; each example's condition
  is another photo of its identity with the curriculum's shuffle probability at this step
  (`fact.shuffled_condition`), its drop probability and FAIR weight ride along."""
  n = len(photos["identity"])
  total = config.fact_steps * config.fact_batch

  @functools.lru_cache(maxsize=4)
  def perm(epoch):
    return np.random.default_rng([config.seed, 4, epoch]).permutation(n)

  def batches(position):
    knobs = curriculum.at(position / total)
    k = position + np.arange(config.fact_batch)
    idx = np.asarray([perm(int(e))[int(i)] for e, i in zip(k // n, k % n)])
    cond = fact_lib.shuffled_condition(photos["identity"], knobs["shuffle"],
                                       np.random.default_rng([config.seed, 5, position]))[idx]
    full = lambda v: np.full((config.fact_batch,), v, np.float32)  # noqa: E731
    return {"images": photos["images"][idx], "background": photos["background"][idx],
            "masks": photos["masks"][idx], "features": photos["features"][cond],
            "drop": full(knobs["drop"]), "fair": full(knobs["fair"])}
  return batches


def train_variant(config: FactToyConfig, variant: str, unet, encoder, photos, states, mesh):
  """Trains (or resumes, or loads) one variant's adapter; saved to `out_dir/<variant>/adapter`."""
  out = os.path.join(config.out_dir, variant)
  adapter_dir = os.path.join(out, "adapter")
  if os.path.exists(os.path.join(adapter_dir, fact_lib.CONFIG_FILE)):
    return fact_lib.load_fact(adapter_dir, unet)
  adapter = fact_lib.init_fact(unet, encoder=encoder, num_tokens=config.num_tokens,
                               seed=config.seed)
  curriculum = config.curriculum(variant)
  tx = loop.AdamW(learning_rate=config.fact_lr, steps=config.fact_steps,
                  warmup_steps=min(50, config.fact_steps), final_lr_fraction=0.1,
                  weight_decay=0.0)
  record = {"config": {"variant": variant, "curriculum": dataclasses.asdict(curriculum),
                       **{k: v for k, v in config.to_record().items()
                          if k.startswith("fact_") or k in ("seed", "num_tokens",
                                                            "per_identity")}}}
  loss = FactLoss(unet.graphdef, adapter.config, _alphas_cumprod(config))
  with loop.Trainer(out, steps=config.fact_steps, checkpoint_every=config.checkpoint_every,
                    log_every=config.log_every, progress=config.progress,
                    desc=f"FACT {variant}") as trainer:
    fit = trainer.fit(loss, tx, adapter.params,
                      {"unet": unet.params, "text": jnp.asarray(states)},
                      fact_batches(config, photos, curriculum), mesh=mesh,
                      batch_size=config.fact_batch, seed=config.seed, record=record,
                      learning_rate=tx.schedule)
  trained = fact_lib.FACTAdapter(adapter.config, jax.device_get(fit.trainable), encoder)
  trained.save(adapter_dir)
  return trained


# --- 5. evaluation ---------------------------------------------------------------------------------

def eval_conditions(config: FactToyConfig, table) -> dict:
  """Condition photos of the train and held-out identities (fresh renders, seed offset), each
  with a target background different from its own."""
  out = {}
  for split, ids in (("train", data.TRAIN_IDS), ("held_out", data.HELD_OUT_IDS)):
    photos = data.make_photos(ids, config.eval_per_identity,
                              config.seed + data.EVAL_SEED_OFFSET, patterns=table)
    rng = np.random.default_rng([config.seed, 6, len(ids)])
    shift = rng.integers(1, len(data.BACKGROUNDS), len(photos["identity"]))
    photos["target_background"] = ((photos["background"] + shift)
                                   % len(data.BACKGROUNDS)).astype(np.int32)
    photos["noise"] = rng.standard_normal(photos["images"].shape).astype(np.float32)
    out[split] = photos
  return out


def generate(pipe, config: FactToyConfig, photos: dict, adapter=None) -> np.ndarray:
  """Images (float NCHW in [-1, 1]) for each condition's target prompt, from its noise; with
  `adapter` the condition's face (its crop, through the adapter's encoder) at `face_scale`."""
  prompts = [data.prompt(int(b)) for b in photos["target_background"]]
  kw = {} if adapter is None else dict(fact=adapter, face=data.condition_crop(photos["images"]),
                                       face_scale=config.face_scale)
  images = pipe.generate(prompt=prompts, latents=photos["noise"], num_steps=config.eval_steps,
                         guidance_scale=config.guidance_scale, seed=config.seed,
                         progress=False, **kw)
  return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def judge_row(judge, photos, images, base_images) -> dict:
  """The four numbers of one model on one split."""
  return {
      "identity_accuracy": data.accuracy(judge.identity(images), photos["identity"]),
      "background_drift": data.background_drift(images, base_images),
      "text_accuracy": data.accuracy(judge.background(images), photos["target_background"]),
      "pose_copy": data.accuracy(judge.pose(images), photos["pose"]),
      "condition_background_leak": data.accuracy(judge.background(images),
                                                 photos["background"]),
  }


def evaluate(config: FactToyConfig, pipe, judge, adapters: dict, table) -> tuple[dict, dict]:
  """{split: {model: row}} and the images ({split: {model: [N, 3, 16, 16]}})."""
  results, images = {}, {}
  for split, photos in eval_conditions(config, table).items():
    base = generate(pipe, config, photos)
    images[split] = {"condition": photos["images"], "base": base}
    results[split] = {"base": judge_row(judge, photos, base, base)}
    for name, adapter in adapters.items():
      gen = generate(pipe, config, photos, adapter)
      images[split][name] = gen
      results[split][name] = judge_row(judge, photos, gen, base)
  return results, images


def save_grid(images: dict, path: str, rows: int = 8):
  """A PNG: one row per condition (train identities first), columns condition / base / each
  variant; pictures upscaled 4x."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = list(images["train"])
  picks = [(s, i) for s in ("train", "held_out") for i in range(0, len(images[s]["base"]),
                                                               max(1, len(images[s]["base"])
                                                                   // (rows // 2)))][:rows]
  fig, axes = plt.subplots(len(picks), len(cols), figsize=(1.3 * len(cols), 1.3 * len(picks)),
                           squeeze=False)
  for r, (split, i) in enumerate(picks):
    for c, name in enumerate(cols):
      img = np.clip((images[split][name][i].transpose(1, 2, 0) + 1) / 2, 0, 1)
      axes[r, c].imshow(img, interpolation="nearest")
      axes[r, c].set_xticks([])
      axes[r, c].set_yticks([])
      if r == 0:
        axes[r, c].set_title(name.replace("_", "\n"), fontsize=7)
      if c == 0:
        axes[r, c].set_ylabel(split.replace("_", "-"), fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- the run ---------------------------------------------------------------------------------------

class StageTimes:
  """Each stage's wall time, measured when the stage ran and kept in `out_dir/stage_seconds.json`,
  so a resumed run still reports what every stage cost (a skipped stage costs ~0 now)."""

  def __init__(self, out_dir: str):
    self.path = os.path.join(out_dir, "stage_seconds.json")
    self.seconds = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.seconds = json.load(f)

  def run(self, name: str, done: bool, fn):
    """`fn()`, timed and recorded unless the stage was `done` before (then its old time stays)."""
    t0 = time.time()
    out = fn()
    if not done or name not in self.seconds:
      self.seconds[name] = time.time() - t0
      if jax.process_index() == 0:
        with open(self.path, "w") as f:
          json.dump(self.seconds, f, indent=2)
    return out


@dataclasses.dataclass
class FactResult:
  results: dict
  seconds: dict
  num_params: dict


def run(config: FactToyConfig) -> FactResult:
  """Every stage (each skipped when its output exists); writes results.json and samples.png."""
  from jaxadapt.diffusion.pipeline import load_pipeline
  mesh = loop.data_mesh(config.data_parallel)
  loop.prepare_out_dir(config.out_dir)
  table = identity_table(config)
  times = StageTimes(config.out_dir)
  out = functools.partial(os.path.join, config.out_dir)
  pipeline_dir = times.run("base", os.path.exists(out("base", "pipeline", "model_index.json")),
                           lambda: train_base(config, table, mesh))
  pipe = load_pipeline(pipeline_dir)
  encoder = times.run("encoder", os.path.exists(out("encoder", "config.json")),
                      lambda: train_encoder(config, table))
  judge_path = out("judge.safetensors")

  def judge_stage():
    if os.path.exists(judge_path):
      return data.FaceJudge.load(judge_path)
    judge = data.train_judge(config.seed, config.judge_steps)
    judge.save(judge_path)
    return judge
  judge = times.run("judge", os.path.exists(judge_path), judge_stage)
  # The pipeline's own prompt encoding (its tokenizer, as saved): the same table the base
  # trained on, without writing a tokenizer into the exported pipeline dir again.
  states = np.asarray(pipe.encode_prompt(PROMPTS), np.float32)
  photos = training_photos(config, table, encoder)
  adapters = {}
  for variant in config.variants:
    adapters[variant] = times.run(
        variant, os.path.exists(out(variant, "adapter", fact_lib.CONFIG_FILE)),
        lambda v=variant: train_variant(config, v, pipe.unet, encoder, photos, states, mesh))
  results, images = times.run("evaluation", False,
                              lambda: evaluate(config, pipe, judge, adapters, table))
  seconds = {k: times.seconds[k] for k in ("base", "encoder", "judge", *config.variants,
                                           "evaluation")}
  first = next(iter(adapters.values()))
  num_params = {"unet": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pipe.unet.params)),
                "adapter": first.num_params,
                "encoder": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(encoder.params))}
  save_grid(images, os.path.join(config.out_dir, "samples.png"))
  with open(os.path.join(config.out_dir, "results.json"), "w") as f:
    json.dump({"config": config.to_record(), "results": results, "seconds": seconds,
               "num_params": num_params, "judge": judge.info}, f, indent=2)
  if config.report:
    from train import fact_report
    fact_report.write(os.path.join(config.out_dir, "results.json"), config.report)
  return FactResult(results=results, seconds=seconds, num_params=num_params)


def config_from_argv(argv: Sequence[str]) -> FactToyConfig:
  return flags.config_from_argv(argv, default="fact_toy", cls=FactToyConfig, doc=__doc__)


def summary(config: FactToyConfig, result: FactResult) -> str:
  rows = []
  for split, models in result.results.items():
    for name, r in models.items():
      rows.append(f"{split:8s} {name:16s} id {r['identity_accuracy']:.3f} drift "
                  f"{r['background_drift']:.4f} text {r['text_accuracy']:.3f} pose-copy "
                  f"{r['pose_copy']:.3f}")
  total = sum(result.seconds.values())
  return "\n".join(rows + [f"{total / 60:.1f} min; outputs in {config.out_dir}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
  return loop.run_main(sys.argv[1:] if argv is None else argv,
                       config_from_argv=config_from_argv, train=run, summary=summary)


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.fact.FactToyConfig` is this class.
  from train import fact as _fact
  sys.exit(_fact.main())
