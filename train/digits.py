"""scikit-learn's digits as a pixel-space diffusion task: data, a class-conditional DiT, a judge.

  python -m train.digits [--config digits_dit] [--out_dir runs/digits_dit] [--steps 2000] ...

The pieces the AGD reproduction (`train/agd.py`, issue #13) stands on:

- `load_digits(split)`: the 1797 8x8 digits of scikit-learn as float32 NCHW `[N, 1, 8, 8]` in
  [-1, 1], labels int32 `[N]`; a fixed stratified split (every 5th image of each class held out).
- `train_base(config)`: a small class-conditional DiT (Peebles & Xie 2023) trained from scratch,
  every parameter, on the shared trainer (`train.loop.Trainer`): DDPM epsilon-prediction
  (Ho et al. 2020, Eq. 14) on t ~ U{0..999} of a linear beta schedule, with the label replaced by
  the null label 10 with probability `label_dropout`, so one network is conditional and
  unconditional and classifier-free guidance works (Ho & Salimans 2022, Sec. 3.2 / Alg. 1). No
  augmentation, as it does not help here: the run is too short to overfit the 1442 training
  images (after digits_dit's 2000 steps the loss on held-out digits is 0.076 against 0.072 on
  the training ones), and flips or shifts would teach digits the data never shows (a flipped
  2 is no digit).
  The result is written as a diffusers `DiTPipeline` folder, `out_dir/pipeline/` (below).
- `DigitsClassifier` / `train_classifier`: a small CNN trained in seconds (the judge): its
  accuracy on samples for their label, and the Frechet distance (Heusel et al. 2017) in its
  penultimate features (`frechet_distance`, `digits_fd`), measure samples.
- `evaluate_base`: samples with DDIM and CFG at several guidance scales and reports both.

The pipeline folder (`out_dir/pipeline/`): `transformer/` (config.json +
diffusion_pytorch_model.safetensors in torch layout; `jaxadapt.models.dit.load_dit` and
diffusers' `DiTTransformer2DModel.from_pretrained` load it), `scheduler/scheduler_config.json`
(a DDIMScheduler with the training betas), and `model_index.json` (`DiTPipeline`, no VAE: the
model works in pixel space, and `id2label` names the digits).

References:
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", Eq. 14 (the simple loss).
  Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Sec. 3.2 and Alg. 1 (label dropout).
  Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT, adaLN-Zero init).
  Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...", Sec. 3 (Frechet dist.).
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (the sampler).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxadapt import sharding as sharding_lib
from jaxadapt.diffusion import schedules
from jaxadapt.diffusion.sampling import sample
from jaxadapt.diffusion.schedulers import scheduler_from_config
from jaxadapt.io.diffusers_save import save_model_dir
from jaxadapt.models import frozen
from jaxadapt.models.dit import DiT, DiTConfig, DiTTransformer2DModel
from jaxadapt.paths import keypath_str
from train import checkpoint as ckpt_lib
from train import flags
from train import loop
from train.loop import RunError

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES          # the DiT label table's last row: "no label" (CFG)
SPLITS = ("train", "held_out", "all")
HELD_OUT_EVERY = 5                # every 5th image of each class (in dataset order) is held out
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Fields that may differ between a run and its resume (they do not change the loss curve).
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                     "data_parallel", "eval_per_class", "eval_steps", "eval_guidance")


# --- data ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits as sk_load_digits
  except ImportError:
    raise ImportError("train.digits needs scikit-learn (its load_digits ships the data); "
                      "pip install scikit-learn") from None
  data = sk_load_digits()
  images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
  labels = data.target.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Indices of `split` in a label array: per class, every `HELD_OUT_EVERY`-th image held out.

  Deterministic and stratified: within each class, in dataset order, images 4, 9, 14, ... are
  held out (~20% of every class); the rest train. "all" is every index.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  labels = np.asarray(labels)
  if split == "all":
    return np.arange(len(labels))
  rank = np.zeros(len(labels), np.int64)  # position of each image within its class
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    rank[where] = np.arange(len(where))
  held = rank % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
  return np.flatnonzero(held if split == "held_out" else ~held)


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits as (images float32 [N, 1, 8, 8] in [-1, 1], labels int32 [N]).

  Args:
    split: "train" (1442 images), "held_out" (355: every 5th of each class) or "all" (1797).
  """
  images, labels = _all_digits()
  idx = split_indices(labels, split)
  return images[idx], labels[idx]


def data_fingerprint() -> str:
  """A short hash of the training split (saved with each checkpoint: data changed = refused)."""
  images, labels = load_digits("train")
  return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]


# --- the DiT base --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitsDiTConfig:
  """Everything a digits base run depends on; `train/configs/digits_*.py` return one."""
  # The DiT (diffusers DiTTransformer2DModel): 8x8x1 pixels, 10 classes + the null label.
  patch_size: int = 2                   # 2 -> 16 tokens of 2x2 pixels; 1 -> 64 tokens
  num_layers: int = 6                   # DiT blocks (AGD adapters attach to each attn1)
  num_attention_heads: int = 4          # heads per block
  attention_head_dim: int = 16          # width of a head; width = heads * head_dim
  # DDPM noise schedule (Ho et al. 2020 Sec. 4): linear betas over num_train_timesteps.
  num_train_timesteps: int = 1000       # diffusion steps T
  beta_start: float = 1e-4              # beta_1
  beta_end: float = 0.02                # beta_T
  label_dropout: float = 0.1            # P(label -> null label) per example (CFG, Ho & Salimans)
  # Training (AdamW with warmup + cosine on the shared trainer).
  steps: int = 2000                     # optimizer steps in the whole run
  batch_size: int = 64                  # global batch (images); divisible by data_parallel
  learning_rate: float = 3e-3           # peak learning rate (after warmup)
  warmup_steps: int = 100               # linear warmup from 0 to learning_rate
  final_lr_fraction: float = 0.05       # cosine decays to learning_rate * this at the last step
  weight_decay: float = 0.0             # AdamW decoupled decay on matrices (not norms/biases)
  grad_clip: float = 1.0                # clip gradients to this global norm; 0 = no clipping
  seed: int = 0                         # init, data order, noise, t and label dropout
  data_parallel: int = 1                # mesh 'data' axis: the batch is split over it
  out_dir: str = "runs/digits_dit"      # checkpoints/, metrics.jsonl, pipeline/, eval.json
  checkpoint_every: int = 500           # save params + optimizer state + data position
  keep_checkpoints: int = 2             # newest checkpoints kept on disk
  log_every: int = 50                   # fetch losses to the host / log / progress bar
  progress: bool = True                 # show the tqdm progress bar
  # Evaluation after training (`python -m train.digits` only; not part of the loss curve).
  eval_per_class: int = 30              # samples per digit at each guidance scale; 0 = no eval
  eval_steps: int = 25                  # DDIM steps per sample
  eval_guidance: tuple[float, ...] = (1.0, 3.0, 5.0)  # CFG scales (1 = conditional alone)

  def __post_init__(self):
    loop.check_numbers(
        self, positive_ints=("patch_size", "num_layers", "num_attention_heads",
                             "attention_head_dim", "num_train_timesteps", "steps", "batch_size",
                             "data_parallel", "checkpoint_every", "keep_checkpoints",
                             "log_every", "eval_steps"),
        ints=("warmup_steps", "seed", "eval_per_class"),
        finite=("beta_start", "beta_end", "label_dropout", "learning_rate",
                "final_lr_fraction", "weight_decay", "grad_clip"))
    if 8 % self.patch_size:
      raise ValueError(f"patch_size must divide the 8x8 digits (1, 2, 4, 8), got "
                       f"{self.patch_size}")
    if (self.num_attention_heads * self.attention_head_dim) % 4:
      raise ValueError(f"width num_attention_heads * attention_head_dim must be a multiple of 4 "
                       f"(2-D sin-cos positions), got {self.num_attention_heads} x "
                       f"{self.attention_head_dim}")
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ValueError(f"expected 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                       f"{self.beta_end}")
    if not 0 <= self.label_dropout < 1:
      raise ValueError(f"label_dropout must be in [0, 1) (0 = no unconditional model, CFG "
                       f"impossible), got {self.label_dropout}")
    if self.batch_size % self.data_parallel:
      raise ValueError(f"batch_size={self.batch_size} must divide evenly over "
                       f"data_parallel={self.data_parallel}")
    if self.eval_per_class < 0:
      raise ValueError(f"eval_per_class must be >= 0, got {self.eval_per_class}")
    if not self.eval_guidance or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 1
        for w in self.eval_guidance):
      raise ValueError(f"eval_guidance must be guidance scales >= 1, got {self.eval_guidance!r}")
    optimizer(self)  # validates the schedule and optimizer settings

  def model_config(self) -> DiTConfig:
    """The DiT architecture (diffusers' `DiTTransformer2DModel` options)."""
    return DiTConfig(num_attention_heads=self.num_attention_heads,
                     attention_head_dim=self.attention_head_dim, in_channels=1, out_channels=1,
                     num_layers=self.num_layers, sample_size=8, patch_size=self.patch_size,
                     num_embeds_ada_norm=NUM_CLASSES)

  def scheduler_config(self) -> dict:
    """The pipeline's diffusers `DDIMScheduler` config: the training betas (DDIM, Song 2021).

    `clip_sample` is off: DDIM clips x0 but steps with the unclipped (guided) epsilon, and
    under CFG that mismatch greys the background (measured: at w=3 the judge's accuracy fell
    from 100% to 61% and the FD rose from 51 to 179); sample_digits clips the final image.
    "trailing" spacing starts at t=999, where the training noise is (Lin et al. 2024 Table 2).
    """
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start, "beta_end": self.beta_end,
            "beta_schedule": "linear", "trained_betas": None, "clip_sample": False,
            "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
            "prediction_type": "epsilon", "thresholding": False,
            "timestep_spacing": "trailing", "rescale_betas_zero_snr": False}

  def to_record(self) -> dict:
    return dataclasses.asdict(self)


def optimizer(config: DigitsDiTConfig) -> loop.AdamW:
  """AdamW with warmup + cosine, after global-norm clipping; decay on matrices only."""
  return loop.AdamW(learning_rate=config.learning_rate, steps=config.steps,
                    warmup_steps=config.warmup_steps, final_lr_fraction=config.final_lr_fraction,
                    weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                    decay_mask=loop.decay_matrices)


def init_dit(config: DiTConfig, seed: int) -> DiT:
  """A randomly initialised DiT, initialised as DiT's training code does (Peebles & Xie 2023).

  Linear and patch-embedding kernels are Xavier-uniform (also the timestep MLP, which DiT draws
  from N(0, 0.02^2): at this size and step count the larger init lets the blocks read t early),
  the label table N(0, 0.5^2), and adaLN-Zero (Sec. 3.2): every block's modulation
  `norm1.linear` and the final layer (`proj_out_1`, `proj_out_2`) start at zero, so each block
  starts as the identity and the output at 0.
  """
  graphdef, state = nnx.split(DiTTransformer2DModel(config, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  flat = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(flat[0]))

  def init(kp, x, key):
    path = keypath_str(kp)
    if ".norm1.linear." in path or path.startswith("proj_out_"):
      return jnp.zeros_like(x)
    if path.endswith(".embedding"):
      return 0.5 * jax.random.normal(key, x.shape, x.dtype)
    if path.endswith(".kernel"):
      fan_out = x.shape[-1]
      fan_in = x.size // fan_out  # conv HWIO: kh * kw * in
      limit = np.sqrt(6.0 / (fan_in + fan_out))
      return jax.random.uniform(key, x.shape, x.dtype, -limit, limit)
    return x
  leaves = [init(kp, x, k) for (kp, x), k in zip(flat[0], keys)]
  return DiT(config, graphdef, jax.tree.unflatten(flat[1], leaves))


@dataclasses.dataclass(frozen=True)
class DDPMLoss:
  """DDPM's simple loss with CFG label dropout, as a hashable `loss_fn` of the trainer.

  `loss = E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y')||^2` with
  t ~ U{0..T-1}, eps ~ N(0, I), y' = null label with probability `label_dropout`, else y
  (Ho et al. 2020 Eq. 14; Ho & Salimans 2022 Alg. 1). Draws come from the step's rng only, so a
  resumed run draws the same.
  """
  graphdef: Any
  num_train_timesteps: int
  beta_start: float
  beta_end: float
  label_dropout: float

  def alphas_cumprod(self) -> np.ndarray:
    return schedules.alphas_cumprod(schedules.make_betas(
        num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
        beta_end=self.beta_end, beta_schedule="linear", trained_betas=None,
        rescale_betas_zero_snr=False))

  def __call__(self, trainable, frozen_tree, batch, rng):
    del frozen_tree  # every parameter trains
    x0, labels = batch["images"], batch["labels"]  # [B, 1, 8, 8], [B]
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, self.num_train_timesteps)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    abar = jnp.asarray(self.alphas_cumprod())[t][:, None, None, None]
    x_t = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
    drop = jax.random.bernoulli(k_drop, self.label_dropout, (b,))
    y = jnp.where(drop, NULL_LABEL, labels)
    pred = frozen.apply(self.graphdef, trainable, "__call__", x_t, t, y)
    return jnp.mean((pred - eps) ** 2)


def digit_batches(seed: int, batch_size: int):
  """`batches(position)`: examples position.. of epoch-wise permutations of the train split.

  Example k is image `perm_e[k mod N]` of epoch e = k // N, `perm_e` drawn from (seed, e): a
  pure function of the position, as the trainer's exact resume needs.
  """
  images, labels = load_digits("train")
  n = len(labels)

  @functools.lru_cache(maxsize=4)
  def perm(epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

  def batches(position):
    k = position + np.arange(batch_size)
    idx = np.asarray([perm(int(e))[int(i)] for e, i in zip(k // n, k % n)])
    return {"images": images[idx], "labels": labels[idx]}
  return batches


@dataclasses.dataclass
class DigitsBaseResult:
  """What `train_base` returns: the run's losses and the trained base."""
  losses: list            # loss of each step this call ran, in order
  first_step: int         # 1-based step of losses[0] (> 1 after a resume)
  model: DiT              # the trained DiT (params on the mesh)
  opt_state: Any          # the optimizer state
  pipeline_dir: Optional[str]  # out_dir/pipeline (None when stopped early)
  seconds: float          # wall time of this call


def train_base(config: DigitsDiTConfig, *, stop_after: Optional[int] = None) -> DigitsBaseResult:
  """Trains (or resumes) the digits DiT as `config` says and writes `out_dir/pipeline/`.

  Args:
    config: the run.
    stop_after: stop once this many steps are done, without the export: a stand-in for
      killing the process (tests). Checkpoints already started are completed.
  """
  start_time = time.time()
  try:
    mesh = sharding_lib.make_mesh(config.data_parallel, 1)
  except ValueError as e:
    raise RunError(f"{e}; set --data_parallel to at most the device count") from None
  model_config = config.model_config()
  record = {"config": config.to_record(), "data_sha256": data_fingerprint(),
            "model_config": json.loads(json.dumps(dataclasses.asdict(model_config)))}
  with loop.Trainer(config.out_dir, steps=config.steps, checkpoint_every=config.checkpoint_every,
                    keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
                    progress=config.progress, desc="digits DiT",
                    resumable=RESUMABLE_CHANGES) as trainer:
    trainer.check_resume(record)
    trainer.refuse_to_overwrite("pipeline", "an exported pipeline")
    model = init_dit(model_config, config.seed)
    params = sharding_lib.shard_params(model.params, mesh)
    tx = optimizer(config)
    loss = DDPMLoss(model.graphdef, config.num_train_timesteps, config.beta_start,
                    config.beta_end, config.label_dropout)
    fit = trainer.fit(loss, tx, params, {}, digit_batches(config.seed, config.batch_size),
                      mesh=mesh, batch_size=config.batch_size, seed=config.seed, record=record,
                      learning_rate=tx.schedule, stop_after=stop_after)
  trained = DiT(model_config, model.graphdef, fit.trainable)
  pipeline_dir = None
  if stop_after is None:
    pipeline_dir = os.path.join(config.out_dir, "pipeline")
    save_pipeline(trained, pipeline_dir, config.scheduler_config())
  return DigitsBaseResult(losses=fit.losses, first_step=fit.first_step, model=trained,
                          opt_state=fit.opt_state, pipeline_dir=pipeline_dir,
                          seconds=time.time() - start_time)


# --- the diffusers export ------------------------------------------------------------------------

def dit_diffusers_config(config: DiTConfig) -> dict:
  """diffusers' `DiTTransformer2DModel` config.json of `config` (`DiTConfig.from_config` reads
  it back)."""
  if config.interpolation_scale != 1.0:
    raise ValueError(f"DiTTransformer2DModel has interpolation_scale 1; got "
                     f"{config.interpolation_scale}")
  return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": "0.30.0",
          "num_attention_heads": config.num_attention_heads,
          "attention_head_dim": config.attention_head_dim, "in_channels": config.in_channels,
          "out_channels": config.out_channels, "num_layers": config.num_layers, "dropout": 0.0,
          "norm_num_groups": 32, "attention_bias": config.attention_bias,
          "sample_size": config.sample_size, "patch_size": config.patch_size,
          "activation_fn": config.activation_fn,
          "num_embeds_ada_norm": config.num_embeds_ada_norm, "upcast_attention": False,
          "norm_type": "ada_norm_zero",
          "norm_elementwise_affine": config.norm_elementwise_affine,
          "norm_eps": config.norm_eps}


def save_dit(model: DiT, directory: str):
  """Writes `model` as a diffusers DiT dir: config.json + diffusion_pytorch_model.safetensors.

  The tensors are in torch layout under diffusers' names (`jaxadapt.io.diffusers_save`), so
  `load_dit` and diffusers' `DiTTransformer2DModel.from_pretrained` load it.
  Multi-host: every process must call it (the params are gathered); the chief writes.
  """
  save_model_dir(model.params, directory, dit_diffusers_config(model.config))


def save_pipeline(model: DiT, directory: str, scheduler_config: dict):
  """Writes a diffusers `DiTPipeline` folder in pixel space: transformer/, scheduler/ and
  model_index.json (`"vae": [null, null]`, `id2label` with the digits' names).

  Multi-host: every process must call it; the chief writes.
  """
  save_dit(model, os.path.join(directory, "transformer"))
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
  with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({**scheduler_config, "_diffusers_version": "0.30.0"}, f, indent=2)
  index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.30.0",
           "transformer": ["diffusers", "DiTTransformer2DModel"],
           "scheduler": ["diffusers", scheduler_config["_class_name"]],
           "vae": [None, None],
           "id2label": {str(i): name for i, name in enumerate(DIGIT_NAMES)}}
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


# --- sampling ------------------------------------------------------------------------------------

def _dit_eps(graphdef, params, x, t, labels):
  """The DiT's noise prediction (pure; wrapped in a `Partial` so params stay jit arguments)."""
  return frozen.apply(graphdef, params, "__call__", x, t, labels)


def sample_digits(model: DiT, labels, *, guidance_scale: float, scheduler_config: dict,
                  num_steps: int = 25, seed: int = 0) -> np.ndarray:
  """Samples one image per label with DDIM and classifier-free guidance.

  Args:
    model: the digits DiT.
    labels: int [B] digits to draw.
    guidance_scale: CFG scale w (Ho & Salimans 2022 Eq. 6); 1 = the conditional model alone.
    scheduler_config: a diffusers scheduler config (the pipeline's `scheduler/`).
    num_steps: sampler steps.
    seed: the initial noise.

  Returns:
    float32 numpy [B, 1, 8, 8], in [-1, 1] (clipped).
  """
  labels = jnp.asarray(labels, jnp.int32)
  sched = scheduler_from_config(scheduler_config)
  noise = jax.random.normal(jax.random.key(seed), (labels.shape[0], 1, 8, 8), jnp.float32)
  denoise = _denoiser(model)
  out = sample(denoise, sched, noise, labels, jnp.full_like(labels, NULL_LABEL),
               float(guidance_scale), num_steps, jax.random.key(seed + 1))
  return np.clip(np.asarray(out), -1.0, 1.0)


_DENOISERS: dict = {}


def _denoiser(model: DiT):
  """One `Partial` per model, so repeated sampling reuses the compiled sampler."""
  key = id(model.params)
  if key not in _DENOISERS:
    _DENOISERS.clear()
    _DENOISERS[key] = (model.params, jax.tree_util.Partial(_dit_eps, model.graphdef,
                                                           model.params))
  return _DENOISERS[key][1]


# --- the judge: a digits classifier --------------------------------------------------------------

def _conv(x, w, b, stride=1):
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                   dimension_numbers=("NCHW", "HWIO", "NCHW"))
  return y + b[None, :, None, None]


def _classifier_features(params, images):
  """Penultimate features [N, 64]: conv3x3(32) -> conv3x3/2(64) -> dense(64), ReLU each."""
  x = jnp.asarray(images, jnp.float32)
  x = jax.nn.relu(_conv(x, params["conv1.kernel"], params["conv1.bias"]))
  x = jax.nn.relu(_conv(x, params["conv2.kernel"], params["conv2.bias"], stride=2))  # 4x4
  x = x.reshape(x.shape[0], -1)
  return jax.nn.relu(x @ params["dense.kernel"] + params["dense.bias"])


def _classifier_logits(params, images):
  return _classifier_features(params, images) @ params["out.kernel"] + params["out.bias"]


_features_jit = jax.jit(_classifier_features)
_logits_jit = jax.jit(_classifier_logits)


def _init_classifier(seed: int) -> dict:
  ks = jax.random.split(jax.random.key(seed), 4)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)  # noqa: E731
  return {"conv1.kernel": he(ks[0], (3, 3, 1, 32), 9), "conv1.bias": jnp.zeros(32),
          "conv2.kernel": he(ks[1], (3, 3, 32, 64), 9 * 32), "conv2.bias": jnp.zeros(64),
          "dense.kernel": he(ks[2], (4 * 4 * 64, 64), 1024), "dense.bias": jnp.zeros(64),
          "out.kernel": he(ks[3], (64, NUM_CLASSES), 64) * 0.5,
          "out.bias": jnp.zeros(NUM_CLASSES)}


class DigitsClassifier:
  """A small CNN on 8x8 digits in [-1, 1] (NCHW): the judge of generated samples.

  `predict` gives labels, `features` the 64-wide penultimate layer (for Frechet distances).
  """

  FEATURES = 64

  def __init__(self, params: dict, info: Optional[dict] = None):
    self.params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    self.info = dict(info or {})  # how it was trained, held-out accuracy

  @staticmethod
  def _check(images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
      raise ValueError(f"expected digits [N, 1, 8, 8] (NCHW, in [-1, 1]), got shape "
                       f"{images.shape}")
    return images

  def logits(self, images) -> np.ndarray:
    """Class logits [N, 10]."""
    return np.asarray(_logits_jit(self.params, self._check(images)))

  def predict(self, images) -> np.ndarray:
    """Predicted digits int32 [N]."""
    return self.logits(images).argmax(-1).astype(np.int32)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features float32 [N, 64]."""
    return np.asarray(_features_jit(self.params, self._check(images)))

  def accuracy(self, images, labels) -> float:
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def save(self, path: str):
    """Writes `path` (.safetensors) and `path` with .json (the info)."""
    ckpt_lib.save_tensors(path, self.params, self.info)

  @classmethod
  def load(cls, path: str) -> "DigitsClassifier":
    """Reads what `save` wrote."""
    want = {k: v.shape for k, v in _init_classifier(0).items()}
    params, info = ckpt_lib.load_tensors(path, want, "classifier (expected a .safetensors "
                                         "written by DigitsClassifier.save)")
    return cls(params, info)


def train_classifier(seed: int = 0, steps: int = 400, *, batch_size: int = 128,
                     learning_rate: float = 3e-3) -> DigitsClassifier:
  """Trains the judge on the train split (Adam, cross-entropy, 1-pixel random shifts).

  Random shifts by up to one pixel make it robust to the small misplacements of generated
  digits; it reaches ~98% on the held-out split in a few seconds on 2 cores.

  Args:
    seed: init and minibatch order.
    steps: Adam steps.
    batch_size: minibatch size.
    learning_rate: Adam learning rate (cosine decay to 0).
  """
  images, labels = load_digits("train")
  params = _init_classifier(seed)
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(_classifier_logits(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1.0)
  for _ in range(steps):
    idx = rng.integers(0, len(labels), batch_size)
    dy, dx = rng.integers(0, 3, 2)
    x = padded[idx, :, dy:dy + 8, dx:dx + 8]
    params, opt_state, _ = step(params, opt_state, x, labels[idx])
  clf = DigitsClassifier(params, {"seed": seed, "steps": steps, "batch_size": batch_size,
                                  "learning_rate": learning_rate})
  clf.info["held_out_accuracy"] = clf.accuracy(*load_digits("held_out"))
  return clf


# --- Frechet distance ----------------------------------------------------------------------------

def frechet_distance(feats_a, feats_b) -> float:
  """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6).

  `||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`, with the trace of the matrix square
  root computed stably as `sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))` (a symmetric PSD matrix
  similar to `S_a S_b`), in float64.

  Args:
    feats_a: [N_a, F] features.
    feats_b: [N_b, F] features.
  """
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"expected two feature sets [N, F] with the same F and N >= 2, got "
                     f"{a.shape} and {b.shape}")
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  w, v = np.linalg.eigh(s_a)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root_a @ s_b @ root_a
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def digits_fd(classifier: DigitsClassifier, images) -> float:
  """Frechet distance of `images` to the held-out real digits, in the classifier's features."""
  real, _ = load_digits("held_out")
  return frechet_distance(classifier.features(images), classifier.features(real))


# --- evaluation ----------------------------------------------------------------------------------

def evaluate_base(model: DiT, classifier: DigitsClassifier, scheduler_config: dict, *,
                  guidance_scales: Sequence[float] = (1.0, 3.0, 5.0), per_class: int = 20,
                  num_steps: int = 25, seed: int = 0) -> dict:
  """Accuracy on samples for their label and Frechet distance to held-out digits, per w.

  Every scale samples from the same noise (`seed`), `per_class` images of each digit.

  Returns:
    {"w=<w>": {"accuracy": float, "fd": float}, "real_train_fd": FD of the train split to the
    held-out split (the floor), "samples": {w: images [10 * per_class, 1, 8, 8]}}.
  """
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
  out = {"samples": {}}
  for w in guidance_scales:
    imgs = sample_digits(model, labels, guidance_scale=w, scheduler_config=scheduler_config,
                         num_steps=num_steps, seed=seed)
    out[f"w={w:g}"] = {"accuracy": classifier.accuracy(imgs, labels),
                       "fd": digits_fd(classifier, imgs)}
    out["samples"][w] = imgs
  out["real_train_fd"] = digits_fd(classifier, load_digits("train")[0])
  return out


# --- command line --------------------------------------------------------------------------------

def config_from_argv(argv: Sequence[str]) -> DigitsDiTConfig:
  """`--config NAME` (default digits_dit) with field overrides, see `train.flags`."""
  return flags.config_from_argv(argv, default="digits_dit", cls=DigitsDiTConfig, doc=__doc__)


def run(config: DigitsDiTConfig) -> DigitsBaseResult:
  """`train_base`, then (when `eval_per_class`) the judge, an evaluation and a sample grid."""
  result = train_base(config)
  print(f"base training took {result.seconds:.0f} s", flush=True)
  if config.eval_per_class and result.pipeline_dir is not None and jax.process_index() == 0:
    from jaxadapt.diffusion.images import save_image_grid, to_uint8
    t0 = time.time()
    clf_path = os.path.join(config.out_dir, "classifier.safetensors")
    if os.path.exists(clf_path):
      clf = DigitsClassifier.load(clf_path)
    else:
      clf = train_classifier(seed=0)
      clf.save(clf_path)
    ev = evaluate_base(result.model, clf, config.scheduler_config(),
                       guidance_scales=config.eval_guidance, per_class=config.eval_per_class,
                       num_steps=config.eval_steps, seed=config.seed)
    samples = ev.pop("samples")
    ev["classifier_held_out_accuracy"] = clf.info.get("held_out_accuracy")
    ev["train_seconds"] = result.seconds
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
      json.dump(ev, f, indent=2)
    for w, imgs in samples.items():  # one row per digit
      per = config.eval_per_class
      grid = imgs.reshape(NUM_CLASSES, per, 1, 8, 8)[:, :min(per, 10)].reshape(-1, 1, 8, 8)
      save_image_grid(to_uint8(grid), os.path.join(config.out_dir, f"samples_w{w:g}.png"),
                      cols=min(per, 10))
    summary = ", ".join(f"{k}: acc {v['accuracy']:.3f} FD {v['fd']:.2f}"
                        for k, v in ev.items() if k.startswith("w="))
    print(f"eval ({time.time() - t0:.0f} s): {summary}; real train vs held-out FD "
          f"{ev['real_train_fd']:.2f}", flush=True)
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.digits`."""
  def outputs(config):
    return (f"pipeline in {os.path.join(config.out_dir, 'pipeline')}, metrics in "
            f"{os.path.join(config.out_dir, 'metrics.jsonl')}")
  return loop.run_main(sys.argv[1:] if argv is None else list(argv),
                       config_from_argv=config_from_argv, train=run, outputs=outputs)


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.digits.DigitsDiTConfig` is this class.
  from train import digits as _digits
  sys.exit(_digits.main())
