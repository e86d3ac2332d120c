"""AGD: collect CFG trajectories (Algorithm 1), train guidance adapters on them (Algorithm 2).

  python -m train.agd --config agd_digits              # the digits reproduction: base DiT,
                                                       # trajectories, adapters, docs/agd.md
  python -m train.agd collect --config agd_digits      # Algorithm 1 only (resumable, multi-host)
  python -m train.agd train --config agd_digits        # Algorithm 2 only (needs the trajectories)
  python -m train.agd eval --config agd_digits         # the evaluation and report only
  jaxadapt train agd ARGS                              # the same: `main(argv)`

Paper: Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free Guidance using Adapters".
The base stays frozen; the adapters (`jaxadapt.agd`) learn to reproduce CFG's prediction
`eps_cfg = eps_u + w (eps_c - eps_u)` in one conditional forward pass.

* Algorithm 1 (`collect`): the full CFG sampler runs with a guidance scale w drawn uniformly from
  `[guidance_min, guidance_max]` (and a uniformly drawn class) per trajectory; every step's
  record `(x_t, t, w, condition, eps_cond, eps_cfg)` is saved. Trajectory i's noise, class and
  w are a pure function of (seed, i), so the data do not depend on how many hosts or devices
  made them. Trajectories are written in shards (`shard_XXXXX/`, one `.npy` per field, renamed
  into place when complete): a rerun skips finished shards (resume), and process p of P makes
  shards p, p + P, ... (multi-host, shared filesystem); inside a process the batch is split over
  its devices. `mode="forward_noised"` makes the paper's ablation instead: the same (t, w, c)
  grid, but x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps from real images x_0, as standard
  guidance distillation trains.
* Algorithm 2 (`train_adapter`): records sampled uniformly over (trajectory, step) through grain
  (`grain.MapDataset`: a seeded shuffle, reshuffled each epoch; each process reads only the rows
  of the global batch that live on its devices), loss `|| eps_adapted(x_t, t, c; w) - eps_cfg ||^2`
  with one forward pass (`jaxadapt.agd.agd_loss`), AdamW with warm-up + cosine, on the shared
  trainer (`train.loop.Trainer`: data-parallel mesh, orbax exact resume, `jax.distributed`
  multi-host through `train.distributed`).

Outputs in --out_dir: trajectories/ (and eval_trajectories/, forward_noised/), adapters/<name>/
(a `jaxadapt.agd.load_agd` dir each) with its run dir runs/<name>/ (checkpoints, metrics.jsonl),
results.json; the reproduction also writes base/ (the digits DiT) and the report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxadapt import agd as agd_lib
from jaxadapt import sharding as sharding_lib
from jaxadapt.diffusion.pipeline import _resolve_scheduler
from jaxadapt.models import frozen as frozen_lib
from train import flags
from train import loop
from train.loop import RunError

STAGES = ("all", "collect", "train", "eval")
FIELDS = ("x", "t", "w", "cond", "eps_cond", "eps_cfg")
MANIFEST = "manifest.json"
CONDITIONS = "conditions.npy"  # Stable Diffusion: the prompts' text states, by condition id
RESUMABLE_CHANGES = ("out_dir", "report", "checkpoint_every", "log_every", "progress",
                     "data_parallel", "stage", "eval_samples", "eval_trajectories",
                     "eval_guidance", "collect_batch", "timing_repeats", "style_steps",
                     "style_rank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AGDTrainConfig:
  """Everything an AGD run depends on; `train/configs/agd_*.py` return one from `get_config()`."""
  pipeline: str = ""                     # the frozen base: a DiTPipeline or Stable Diffusion
                                         # dir; "" = train the digits base (`base_config`) first
  prompts: str = ""                      # Stable Diffusion: a text file, one prompt per line
  base_config: str = "digits_dit"        # train/configs module of the digits base (pipeline "")
  out_dir: str = "runs/agd"              # trajectories, adapters, checkpoints, results.json
  report: Optional[str] = None           # the results page (reproduction); None = docs/agd.md
  stage: str = "all"                     # all | collect | train | eval (the subcommand)
  kinds: tuple = ("offset", "cross_attention", "token")  # adapters trained (one run each)
  default_kind: str = "offset"           # the adapter the targets are read on
  ablation: bool = True                  # also train default_kind on forward-noised data
  hidden: int = 32                       # adapter width H
  heads: int = 4                         # cross-attention adapter heads
  fourier_features: int = 64             # random Fourier features of w
  fourier_std: float = 1.0               # their frequencies' std (cycles per unit of w)
  scale_by_guidance: bool = False        # adapters' outputs times (w - 1) (ours; see jaxadapt.agd)
  guidance_min: float = 1.0              # w ~ U[guidance_min, guidance_max] per trajectory
  guidance_max: float = 6.0
  scheduler: str = "ddim"                # the sampler of the trajectories and of evaluation
  num_steps: int = 20                    # sampler steps per trajectory
  num_trajectories: int = 1024           # training trajectories (x num_steps records)
  shard_size: int = 128                  # trajectories per shard on disk
  collect_batch: int = 128               # trajectories sampled at once
  eval_guidance: tuple = (1.5, 3.0, 5.0, 8.0)  # w of the evaluation (8: outside the range)
  eval_trajectories: int = 64            # held-out trajectories per evaluation w
  eval_samples: int = 500                # samples per w and row (FD, accuracy, RMSE)
  timing_repeats: int = 3                # timed sampling runs per row (the median is reported)
  steps: int = 1500                      # optimizer steps per adapter
  batch_size: int = 256                  # records per batch
  learning_rate: float = 1e-3            # peak AdamW learning rate
  warmup_steps: int = 100                # linear warm-up, then cosine to final_lr_fraction
  final_lr_fraction: float = 0.05
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  checkpoint_every: int = 500
  log_every: int = 50
  style_steps: int = 300                 # the derived-checkpoint check: a style LoRA trained this
                                         # long on bold digits, merged into the base (0 = off)
  style_rank: int = 4                    # its rank
  seed: int = 0                          # trajectories, adapter init and batches
  data_parallel: int = 1                 # devices on the data axis (all hosts together)
  progress: bool = True                  # progress bars

  def __post_init__(self):
    loop.check_numbers(self, positive_ints=(
        "hidden", "heads", "fourier_features", "num_steps", "num_trajectories", "shard_size",
        "collect_batch", "eval_trajectories", "eval_samples", "timing_repeats", "steps",
        "batch_size", "checkpoint_every", "log_every", "data_parallel"),
        ints=("warmup_steps", "seed", "style_steps", "style_rank"),
        finite=("fourier_std", "guidance_min", "guidance_max", "learning_rate",
                "final_lr_fraction", "weight_decay", "grad_clip"))
    if self.stage not in STAGES:
      raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
    bad = [k for k in self.kinds if k not in agd_lib.KINDS]
    if bad or not self.kinds:
      raise ValueError(f"kinds must be a non-empty subset of {agd_lib.KINDS}, got {self.kinds!r}")
    if self.default_kind not in self.kinds:
      raise ValueError(f"default_kind {self.default_kind!r} must be one of kinds {self.kinds}")
    if not 0 <= self.guidance_min < self.guidance_max:
      raise ValueError(f"need 0 <= guidance_min < guidance_max, got {self.guidance_min}, "
                       f"{self.guidance_max}")
    if not self.pipeline and not self.base_config:
      raise ValueError("set pipeline (a DiTPipeline dir) or base_config (the digits base)")

  def to_record(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def optimizer(self) -> loop.AdamW:
    return loop.AdamW(learning_rate=self.learning_rate, steps=self.steps,
                      warmup_steps=min(self.warmup_steps, self.steps),
                      final_lr_fraction=self.final_lr_fraction,
                      weight_decay=self.weight_decay, grad_clip=self.grad_clip)

  def pipeline_dir(self) -> str:
    return self.pipeline or os.path.join(self.out_dir, "base", "pipeline")

  def adapter_names(self) -> list[str]:
    """The trained adapters: each kind, and `<default_kind>_forward_noised` (the ablation)."""
    names = list(self.kinds)
    return names + [f"{self.default_kind}_forward_noised"] if self.ablation else names

  def agd_config(self, pipe, kind: str) -> agd_lib.AGDConfig:
    extra = {}
    if kind == "cross_attention" and getattr(pipe, "tokenizer", None) is not None:
      extra["context_tokens"] = int(pipe.tokenizer.model_max_length)  # the prompt length
    return agd_lib.config_for(pipe.backbone, kind=kind, hidden=self.hidden, heads=self.heads,
                              fourier_features=self.fourier_features,
                              fourier_std=self.fourier_std, seed=self.seed,
                              scale_by_guidance=self.scale_by_guidance,
                              guidance_range=(self.guidance_min, self.guidance_max), **extra)


# --- the base -----------------------------------------------------------------------------------

def load_base(directory: str):
  """The frozen pipeline of `directory`: a DiTPipeline (class labels) or a Stable Diffusion
  pipeline (prompts); RunError when it is missing."""
  from jaxadapt.diffusion.pipeline import load_pipeline
  if not os.path.isdir(directory):
    raise RunError(f"pipeline {directory}: no such dir (a diffusers DiTPipeline or Stable "
                   f"Diffusion folder; leave --pipeline empty to train the digits base first)")
  return load_pipeline(directory)


def read_prompts(path: str) -> list[str]:
  """The prompts of a Stable Diffusion run: one per non-empty line of `path`."""
  if not path:
    raise RunError("a Stable Diffusion pipeline needs --prompts (a text file, one prompt per "
                   "line): the conditions its trajectories are drawn from")
  if not os.path.isfile(path):
    raise RunError(f"--prompts {path}: no such file (one prompt per line)")
  with open(path) as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise RunError(f"--prompts {path} holds no prompt")
  return prompts


@dataclasses.dataclass
class Conditions:
  """What a trajectory is conditioned on, as an integer id per trajectory.

  DiT: the class label, null = `num_classes`. Stable Diffusion: a prompt index into `states`
  [P + 1, L, D] (the text encoder's states; row P is the empty prompt, the null condition).
  """
  count: int                        # ids a trajectory draws from: [0, count)
  null: int                         # the unconditional id
  states: Optional[np.ndarray] = None  # SD: [P + 1, L, D]

  def lookup(self, ids):
    """What the backbone takes for `ids`: the labels themselves, or their text states."""
    return ids if self.states is None else jnp.asarray(self.states)[ids]


def conditions(pipe, prompts: Optional[Sequence[str]] = None) -> Conditions:
  from jaxadapt.diffusion.pipeline import DiTPipeline
  if isinstance(pipe, DiTPipeline):
    if prompts:
      raise RunError("--prompts is for Stable Diffusion pipelines; a DiT draws class labels")
    return Conditions(count=pipe.num_classes, null=pipe.num_classes)
  if not prompts:
    raise RunError("a Stable Diffusion pipeline needs --prompts (a text file, one prompt per "
                   "line)")
  states = np.asarray(pipe.encode_prompt(list(prompts) + [""]), np.float32)
  return Conditions(count=len(prompts), null=len(prompts), states=states)


def sample_shape(pipe) -> tuple:
  """The backbone's sample [C, H, W] at its default size."""
  h, w = pipe._latent_size(None, None, None)
  return (pipe.latent_channels, h, w)


def _fingerprint(pipe) -> dict:
  """What identifies the base: its config and a checksum of its weights (computed once per
  pipeline object: a run collects several sets and trains several adapters on one base)."""
  cached = getattr(pipe, "_agd_fingerprint", None)
  if cached is not None:
    return cached
  leaves = jax.tree.leaves(pipe.backbone.params)
  checksum = float(sum(float(jnp.sum(jnp.abs(x.astype(jnp.float32)))) for x in leaves))
  pipe._agd_fingerprint = {
      "base_config": json.loads(json.dumps(dataclasses.asdict(pipe.backbone.config),
                                           default=str)),
      "base_checksum": round(checksum, 3)}
  return pipe._agd_fingerprint


def _denoise_fn(model, cond: Conditions):
  """`denoise(x, t, ids)`: the backbone on condition ids (labels, or prompt states by index)."""
  states = None if cond.states is None else jnp.asarray(cond.states)
  return jax.tree_util.Partial(_ids_denoise, model.graphdef, model.params, states)


def _ids_denoise(graphdef, params, states, x, t, ids):
  c = ids if states is None else states[ids]
  return frozen_lib.apply(graphdef, params, "__call__", x, t, c)


# --- Algorithm 1: trajectories on disk ------------------------------------------------------------

def _trajectory_draws(i: int, seed: int, shape: tuple, num_classes: int, w_range, w_values):
  """Trajectory i's (noise, condition id, w): a pure function of (seed, i)."""
  rng = np.random.default_rng([seed, i])
  noise = rng.standard_normal(shape).astype(np.float32)
  label = int(rng.integers(num_classes))
  w = (float(w_values[i % len(w_values)]) if w_values is not None
       else float(rng.uniform(*w_range)))
  return noise, label, w


@dataclasses.dataclass(frozen=True)
class CollectSpec:
  """What a trajectory set is: recorded in its manifest, checked on resume."""
  mode: str                  # "trajectories" (Algorithm 1) or "forward_noised" (ablation)
  num_trajectories: int
  shard_size: int
  num_steps: int
  scheduler: str
  seed: int
  guidance_range: tuple      # (lo, hi), used when guidance_values is None
  guidance_values: Optional[tuple] = None  # fixed w per trajectory (i mod len): evaluation sets
  prompts: Optional[tuple] = None  # Stable Diffusion: the prompts (condition id = index)


# Algorithm 1 on a batch of trajectories, compiled once per (scheduler, steps, shapes).
_trajectory_batch = jax.jit(agd_lib.cfg_trajectory, static_argnums=(1, 6))


@jax.jit
def _forward_noised_batch(denoise, alphas, x0, noise, t, labels, null, w):
  """Records of the ablation: x_t from real x_0 at timestep t, with eps_cond and eps_cfg."""
  a = alphas[t][:, None, None, None]
  x = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
  b = x.shape[0]
  out = denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([labels, jnp.full_like(labels, null)]))
  c = x.shape[1]
  eps_c, eps_u = out[:b, :c], out[b:, :c]
  return x, eps_c, eps_u + w[:, None, None, None] * (eps_c - eps_u)


def collect(pipe, out_dir: str, spec: CollectSpec, *, batch: int, progress: bool = True,
            real_images: Optional[np.ndarray] = None) -> dict:
  """Writes `spec`'s records into `out_dir` (AGD Algorithm 1); returns the manifest.

  Resumable (finished shards are kept) and multi-host (process p makes shards p, p + P, ...;
  the batch is split over the process's local devices). `real_images` [M, C, H, W]: the x_0
  pool of the forward-noised mode. A Stable Diffusion pipeline draws prompts (`spec.prompts`)
  and writes their text states once, `conditions.npy` [P + 1, L, D] (the last row: "").
  """
  from tqdm.auto import tqdm
  model = pipe.backbone
  shape = sample_shape(pipe)
  cond = conditions(pipe, spec.prompts)
  manifest = {"spec": dataclasses.asdict(spec), "fields": list(FIELDS),
              "sample_shape": list(shape), **_fingerprint(pipe)}
  manifest = json.loads(json.dumps(manifest))
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != manifest:
      diff = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
      raise RunError(f"{out_dir} holds trajectories of another collection (differs in {diff}); "
                     f"resuming would mix them. Use another --out_dir, or the same settings.")
  elif jax.process_index() == 0:
    if cond.states is not None:
      np.save(os.path.join(out_dir, CONDITIONS), cond.states)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
  if spec.mode == "forward_noised" and real_images is None:
    raise ValueError("forward_noised collection needs real_images (the x_0 pool)")

  sched = _resolve_scheduler(spec.scheduler, pipe.scheduler_config)
  devices = jax.local_devices()
  mesh = sharding_lib.make_mesh(len(devices), 1, devices=devices)
  rows = NamedSharding(mesh, P(sharding_lib.DATA))
  batch = -(-batch // len(devices)) * len(devices)
  denoise = _denoise_fn(model, cond)
  null = cond.null
  state = sched.init_state(spec.num_steps, jnp.zeros((1,) + shape))
  timesteps = np.asarray(state.timesteps)
  alphas = jnp.asarray(_alphas_cumprod(sched))
  w_values = spec.guidance_values
  num_shards = -(-spec.num_trajectories // spec.shard_size)
  mine = [k for k in range(num_shards) if k % jax.process_count() == jax.process_index()]
  todo = [k for k in mine if not os.path.isdir(_shard_dir(out_dir, k))]
  bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"collect {spec.mode}",
             unit="shard", disable=not progress)
  for k in todo:
    lo, hi = k * spec.shard_size, min((k + 1) * spec.shard_size, spec.num_trajectories)
    parts = {f: [] for f in FIELDS}
    for start in range(lo, hi, batch):
      ids = list(range(start, min(start + batch, hi)))
      draws = [_trajectory_draws(i, spec.seed, shape, cond.count, spec.guidance_range,
                                 w_values) for i in ids]
      pad = batch - len(ids)
      noise = np.stack([d[0] for d in draws] + [draws[0][0]] * pad)
      labels = np.asarray([d[1] for d in draws] + [draws[0][1]] * pad, np.int32)
      w = np.asarray([d[2] for d in draws] + [draws[0][2]] * pad, np.float32)
      put = lambda a: jax.device_put(a, rows)  # noqa: E731
      n = len(ids)
      if spec.mode == "trajectories":
        rec = _trajectory_batch(denoise, sched, put(noise), put(labels),
                                put(np.full_like(labels, null)), put(w), spec.num_steps)
        rec = jax.device_get(rec)
        # [steps, B, ...] -> records in (trajectory, step) order
        per = lambda a: np.swapaxes(a, 0, 1)[:n].reshape((-1,) + a.shape[2:])  # noqa: E731
        parts["x"].append(per(rec["x"]))
        parts["eps_cond"].append(per(rec["eps_cond"]))
        parts["eps_cfg"].append(per(rec["eps_cfg"]))
        t_rec = np.broadcast_to(np.asarray(rec["t"])[None], (n, spec.num_steps))
      else:
        x_list, ec_list, eg_list = [], [], []
        for j in range(spec.num_steps):
          rng = np.random.default_rng([spec.seed, 7, start, j])
          x0 = real_images[rng.integers(len(real_images), size=batch)]
          eps = rng.standard_normal((batch,) + shape).astype(np.float32)
          t = np.full((batch,), timesteps[j], np.int32)
          xj, ecj, egj = jax.device_get(_forward_noised_batch(
              denoise, alphas, put(x0.astype(np.float32)), put(eps), put(t), put(labels),
              null, put(w)))
          x_list.append(xj[:n]); ec_list.append(ecj[:n]); eg_list.append(egj[:n])  # noqa: E702
        stack = lambda xs: np.stack(xs, 1).reshape((-1,) + shape)  # noqa: E731
        parts["x"].append(stack(x_list))
        parts["eps_cond"].append(stack(ec_list))
        parts["eps_cfg"].append(stack(eg_list))
        t_rec = np.broadcast_to(timesteps[None], (n, spec.num_steps))
      parts["t"].append(np.asarray(t_rec, np.float32).reshape(-1))
      parts["w"].append(np.repeat(w[:n], spec.num_steps))
      parts["cond"].append(np.repeat(labels[:n], spec.num_steps))
    _write_shard(out_dir, k, {f: np.concatenate(v) for f, v in parts.items()})
    bar.update(1)
  bar.close()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"agd collect {out_dir}")
  return manifest


def _alphas_cumprod(sched) -> np.ndarray:
  """The schedule's abar_t [num_train_timesteps] (forward noising of the ablation)."""
  return np.asarray(sched.alphas_cumprod(), np.float32)


def _shard_dir(out_dir: str, k: int) -> str:
  return os.path.join(out_dir, f"shard_{k:05d}")


def _write_shard(out_dir: str, k: int, arrays: dict) -> None:
  """Writes shard k's arrays, then renames the folder into place (a kill leaves no half shard)."""
  final = _shard_dir(out_dir, k)
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, value in arrays.items():
    np.save(os.path.join(tmp, f"{name}.npy"), value)
  os.replace(tmp, final)


class TrajectoryShards:
  """The records of a collection as a grain random-access source (`len`, `[i]`), memory-mapped.

  Raises RunError when the folder holds no finished collection.
  """

  def __init__(self, directory: str):
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise RunError(f"{directory}: no trajectories here (no {MANIFEST}); run "
                     f"`python -m train.agd collect` first")
    with open(path) as f:
      self.manifest = json.load(f)
    spec = self.manifest["spec"]
    num_shards = -(-spec["num_trajectories"] // spec["shard_size"])
    missing = [k for k in range(num_shards) if not os.path.isdir(_shard_dir(directory, k))]
    if missing:
      raise RunError(f"{directory}: {len(missing)} of {num_shards} shards are missing (e.g. "
                     f"{missing[:3]}); finish the collection (rerun `collect`, it resumes)")
    self.directory = directory
    self.shards = [{f: np.load(os.path.join(_shard_dir(directory, k), f"{f}.npy"),
                               mmap_mode="r") for f in FIELDS} for k in range(num_shards)]
    self.offsets = np.cumsum([0] + [len(s["t"]) for s in self.shards])
    path = os.path.join(directory, CONDITIONS)
    # What the backbone takes as "cond": the label itself, or the prompt's text states.
    self.conditions = np.load(path, mmap_mode="r") if os.path.exists(path) else None

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    k = int(np.searchsorted(self.offsets, i, side="right") - 1)
    j = i - int(self.offsets[k])
    rec = {f: np.asarray(self.shards[k][f][j]) for f in FIELDS}
    if self.conditions is not None:
      rec["cond"] = np.asarray(self.conditions[int(rec["cond"])])
    return rec

  def arrays(self) -> dict:
    """Every record's fields, concatenated (evaluation sets are small); "cond" holds the ids."""
    return {f: np.concatenate([np.asarray(s[f]) for s in self.shards]) for f in FIELDS}


class RecordBatches:
  """`batches(position)` for the trainer: records `position .. position + B - 1` of a seeded
  grain shuffle of the collection (reshuffled each epoch: uniform over (trajectory, step)).

  Only the rows of the global batch that live on this process's devices are read (each host
  its share); the other rows are zeros that `make_array_from_callback` never looks at.
  """

  def __init__(self, source: TrajectoryShards, batch_size: int, seed: int, sharding):
    import grain
    self.dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    self.batch_size = batch_size
    self.example = source[0]
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    rows = set()
    for (sl,) in index_map.values():
      rows.update(range(*sl.indices(batch_size)))
    self.rows = sorted(rows)

  def __call__(self, position: int) -> dict:
    out = {f: np.zeros((self.batch_size,) + v.shape, v.dtype) for f, v in self.example.items()}
    for r in self.rows:
      rec = self.dataset[position + r]
      for f in FIELDS:
        out[f][r] = rec[f]
    return out


# --- Algorithm 2: the adapters ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AGDLoss:
  """`|| eps_adapted(x_t, t, c; w) - eps_cfg ||^2` with one forward pass (AGD Algorithm 2);
  the metric `rel` is the loss over `|| eps_cond - eps_cfg ||^2` (the share of CFG's squared
  gap still open)."""
  graphdef: object
  config: agd_lib.AGDConfig

  def __call__(self, trainable, frozen, batch, rng):
    del rng
    params = agd_lib.with_trainable({"fourier": frozen["fourier"]}, trainable)
    ctx = agd_lib.context(self.config, params, batch["w"])
    pred = frozen_lib.apply(self.graphdef, frozen["base"], "__call__", batch["x"], batch["t"],
                            batch["cond"], ctx=ctx)
    loss = agd_lib.agd_loss(pred, batch["eps_cfg"])
    gap = jnp.mean(jnp.square(batch["eps_cond"] - batch["eps_cfg"]))
    return loss, {"rel": loss / jnp.maximum(gap, 1e-12)}


def _record(config: AGDTrainConfig, name: str, manifest: dict) -> dict:
  keep = {k: v for k, v in config.to_record().items() if k not in RESUMABLE_CHANGES}
  return {"config": keep, "adapter": name, "data": manifest}


def train_adapter(config: AGDTrainConfig, pipe, name: str, data_dir: str, mesh, *,
                  stop_after: Optional[int] = None):
  """Trains adapter `name` (a kind, or `<kind>_forward_noised`) on the records of `data_dir`;
  returns (AGDAdapter, FitResult). Resumes from `out_dir/runs/<name>` when it has a checkpoint."""
  kind = name.split("_forward_noised")[0]
  model = pipe.backbone
  agd_config = config.agd_config(pipe, kind)
  adapter = agd_lib.AGDAdapter(agd_config, agd_lib.init_params(agd_config))
  source = TrajectoryShards(data_dir)
  batch_sharding = NamedSharding(mesh, P(loop.DATA_AXIS))
  batches = RecordBatches(source, config.batch_size, config.seed, batch_sharding)
  tx = config.optimizer()
  frozen = {"base": model.params, "fourier": adapter.params["fourier"]}
  with loop.Trainer(os.path.join(config.out_dir, "runs", name), steps=config.steps,
                    checkpoint_every=config.checkpoint_every, keep_checkpoints=1,
                    log_every=config.log_every, progress=config.progress, desc=f"agd {name}",
                    resumable=RESUMABLE_CHANGES) as trainer:
    start = jax.tree.map(lambda a: jnp.array(a, copy=True), agd_lib.trainable_part(adapter.params))
    fit = trainer.fit(AGDLoss(model.graphdef, adapter.config), tx, start, frozen, batches,
                      mesh=mesh, batch_size=config.batch_size, seed=config.seed,
                      record=_record(config, name, source.manifest),
                      batch_sharding=batch_sharding, learning_rate=tx.schedule,
                      stop_after=stop_after)
  params = agd_lib.with_trainable(adapter.params, jax.device_get(fit.trainable))
  return agd_lib.AGDAdapter(adapter.config, params), fit


# --- a checkpoint derived from the base: the base + a style LoRA merged in -------------------------

STYLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def bold(images: np.ndarray) -> np.ndarray:
  """The style: digits with thicker strokes (a 2x2 max filter, images in [-1, 1] NCHW)."""
  p = np.pad(images, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-1.0)
  return np.maximum.reduce([p[..., dy:dy + 8, dx:dx + 8] for dy in (0, 1) for dx in (0, 1)])


@dataclasses.dataclass(frozen=True)
class StyleLoRALoss:
  """The digits DDPM loss (`train.digits.DDPMLoss`, label dropout included) of the base with a
  LoRA merged in; only the LoRA trains."""
  ddpm: object
  lora_config: object

  def __call__(self, trainable, frozen, batch, rng):
    from jaxadapt.adapters import lora as lora_lib
    merged, _ = lora_lib.merge_params(frozen["base"], lora_lib.LoraAdapter(
        weights=trainable, config=self.lora_config))
    return self.ddpm(merged, {}, batch, rng)


def train_style_lora(config: AGDTrainConfig, pipe, mesh):
  """A style LoRA on the digits base (bold strokes, `style_steps` steps): the checkpoint
  "derived from the same base" that the paper says AGD adapters combine with."""
  import jaxadapt as ja
  from jaxadapt.adapters.lora import LoraConfig
  from train import digits
  model = pipe.backbone
  base_cfg = flags.load_config_module(config.base_config)
  lora_cfg = LoraConfig(r=config.style_rank, lora_alpha=float(config.style_rank),
                        target_modules=STYLE_TARGETS)
  lora = ja.init_lora(model, lora_cfg, seed=config.seed)
  ddpm = digits.DDPMLoss(model.graphdef, base_cfg.num_train_timesteps, base_cfg.beta_start,
                         base_cfg.beta_end, base_cfg.label_dropout)
  plain = digits.digit_batches(config.seed, 128)

  def batches(position):
    b = plain(position)
    return {"images": bold(b["images"]), "labels": b["labels"]}
  tx = loop.AdamW(learning_rate=3e-3, steps=config.style_steps,
                  warmup_steps=min(50, config.style_steps))
  with loop.Trainer(os.path.join(config.out_dir, "runs", "style_lora"), steps=config.style_steps,
                    checkpoint_every=config.style_steps, keep_checkpoints=1,
                    log_every=config.log_every, progress=config.progress,
                    desc="style lora") as trainer:
    start = jax.tree.map(lambda a: jnp.array(a, copy=True), lora.weights)
    fit = trainer.fit(StyleLoRALoss(ddpm, lora_cfg), tx, start, {"base": model.params},
                      batches, mesh=mesh, batch_size=128, seed=config.seed,
                      record={"config": {"style_steps": config.style_steps,
                                         "style_rank": config.style_rank, "seed": config.seed},
                              "adapter": "style_lora", **_fingerprint(pipe)})
  return dataclasses.replace(lora, weights=jax.device_get(fit.trainable))


def styled_pipeline(pipe, lora):
  """`pipe` with `lora` merged into its backbone (a new checkpoint derived from the base)."""
  import copy
  import jaxadapt as ja
  styled = copy.copy(pipe)
  styled.__dict__.pop("_agd_fingerprint", None)  # other weights: its own fingerprint
  setattr(styled, pipe.backbone_name, ja.merge(pipe.backbone, lora))
  return styled


# --- the run --------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
  """What `train` returns (`loop.run_main` reads `losses` and `first_step`)."""
  losses: list
  first_step: int
  adapters: dict
  results: dict
  seconds: dict


def _prompts(config: AGDTrainConfig) -> Optional[tuple]:
  return tuple(read_prompts(config.prompts)) if config.prompts else None


def train_spec(config: AGDTrainConfig, mode: str = "trajectories") -> CollectSpec:
  return CollectSpec(mode=mode, num_trajectories=config.num_trajectories,
                     shard_size=config.shard_size, num_steps=config.num_steps,
                     scheduler=config.scheduler, seed=config.seed,
                     guidance_range=(config.guidance_min, config.guidance_max),
                     prompts=_prompts(config))


def eval_spec(config: AGDTrainConfig) -> CollectSpec:
  """Held-out trajectories: another seed, `eval_trajectories` per evaluation w."""
  n = config.eval_trajectories * len(config.eval_guidance)
  return CollectSpec(mode="trajectories", num_trajectories=n, shard_size=config.shard_size,
                     num_steps=config.num_steps, scheduler=config.scheduler,
                     seed=config.seed + 10_000,
                     guidance_range=(config.guidance_min, config.guidance_max),
                     guidance_values=tuple(float(w) for w in config.eval_guidance),
                     prompts=_prompts(config))


def _real_images() -> np.ndarray:
  """The x_0 pool of the forward-noised ablation: the digits training split."""
  from train import digits
  return digits.load_digits("train")[0]


def _ensure_base(config: AGDTrainConfig) -> dict:
  """Trains the digits base into out_dir/base unless `pipeline` names one; returns timings."""
  if config.pipeline or os.path.exists(os.path.join(config.pipeline_dir(), "model_index.json")):
    return {}
  from train import digits
  t0 = time.time()
  base = flags.load_config_module(config.base_config)
  base = dataclasses.replace(base, out_dir=os.path.join(config.out_dir, "base"),
                             progress=config.progress)
  digits.train_base(base)
  return {"base": time.time() - t0}


def train(config: AGDTrainConfig, *, command: Optional[str] = None) -> RunResult:
  """Runs the configured stage(s): base (digits), collect, train, eval + report."""
  t0 = time.time()
  seconds = {"load_start": os.getloadavg()[0]}
  mesh = loop.data_mesh(config.data_parallel)
  if config.stage in ("all", "collect"):
    seconds.update(_ensure_base(config))
  pipe = load_base(config.pipeline_dir())
  from train import agd_report
  if config.ablation and not agd_report.is_digits(pipe):
    raise RunError("the forward-noised ablation draws x_0 from the digits; for another base "
                   "set --ablation=false (real latents for it are not collected yet)")
  traj = os.path.join(config.out_dir, "trajectories")
  held = os.path.join(config.out_dir, "eval_trajectories")
  noised = os.path.join(config.out_dir, "forward_noised")
  if config.stage in ("all", "collect"):
    t1 = time.time()
    collect(pipe, traj, train_spec(config), batch=config.collect_batch,
            progress=config.progress)
    collect(pipe, held, eval_spec(config), batch=config.collect_batch, progress=config.progress)
    if config.ablation:
      collect(pipe, noised, train_spec(config, "forward_noised"), batch=config.collect_batch,
              progress=config.progress, real_images=_real_images())
    seconds["collect"] = time.time() - t1
  adapters, losses, first = {}, [], config.steps + 1
  if config.stage in ("all", "train"):
    for name in config.adapter_names():
      t1 = time.time()
      data = noised if name.endswith("_forward_noised") else traj
      adapter, fit = train_adapter(config, pipe, name, data, mesh)
      if fit.losses and not losses:
        losses, first = fit.losses, fit.first_step
      if jax.process_index() == 0:
        adapter.save(os.path.join(config.out_dir, "adapters", name))
      adapters[name] = adapter
      seconds[f"train_{name}"] = time.time() - t1
  style = None
  style_dir = os.path.join(config.out_dir, "style_lora")
  if config.style_steps and agd_report.is_digits(pipe) and config.stage in ("all", "train"):
    from jaxadapt.io.peft import save_adapter
    t1 = time.time()
    style = train_style_lora(config, pipe, mesh)
    if jax.process_index() == 0:
      save_adapter(style, style_dir)
    seconds["style_lora"] = time.time() - t1
  results = {}
  if config.stage in ("all", "eval"):
    t1 = time.time()
    if not adapters:
      adapters = {n: agd_lib.load_agd(os.path.join(config.out_dir, "adapters", n),
                                      pipe.backbone) for n in config.adapter_names()}
    if style is None and config.style_steps and os.path.isdir(style_dir):
      from jaxadapt.io.peft import load_adapter
      style = load_adapter(style_dir)
    styled = None
    if style is not None:  # held-out CFG trajectories of the derived checkpoint
      styled = styled_pipeline(pipe, style)
      collect(styled, os.path.join(config.out_dir, "style_eval_trajectories"),
              eval_spec(config), batch=config.collect_batch, progress=config.progress)
    results = agd_report.evaluate(config, pipe, adapters, TrajectoryShards(held))
    if styled is not None:
      results["style"] = agd_report.evaluate_derived(
          config, pipe, styled, adapters[config.default_kind],
          TrajectoryShards(os.path.join(config.out_dir, "style_eval_trajectories")))
    seconds["eval"] = time.time() - t1
  seconds["total"] = time.time() - t0
  seconds["load_end"] = os.getloadavg()[0]
  if results and jax.process_index() == 0:
    previous = os.path.join(config.out_dir, "results.json")
    if config.stage == "eval" and os.path.isfile(previous):  # keep the training run's times
      with open(previous) as f:
        old = json.load(f).get("seconds", {})
      seconds = {**{k: v for k, v in old.items() if k not in seconds or k == "total"},
                 **{k: v for k, v in seconds.items() if k != "total"},
                 "total": old.get("total", 0.0) - old.get("eval", 0.0) + seconds["eval"]}
    with open(previous, "w") as f:
      json.dump({"results": results, "seconds": seconds, "config": config.to_record()}, f,
                indent=1)
    if command is None:  # the command that trains (an `eval` run re-evaluates its output)
      command = "python -m train.agd " + " ".join(a for a in sys.argv[1:] if a not in STAGES)
      if config.stage == "eval":
        seconds["reevaluated_with"] = "python -m train.agd " + " ".join(sys.argv[1:])
    agd_report.write_report(config, pipe, adapters, results, seconds, command.strip())
  return RunResult(losses=losses, first_step=first, adapters=adapters, results=results,
                   seconds=seconds)


def config_from_argv(argv: Sequence[str]) -> AGDTrainConfig:
  """`[collect|train|eval] --config NAME` (default agd_digits) with field overrides."""
  argv = list(argv)
  if argv and argv[0] in STAGES:
    argv = argv[1:] + [f"--stage={argv[0]}"]
  return flags.config_from_argv(argv, default="agd_digits", cls=AGDTrainConfig, doc=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.agd` and `jaxadapt train agd`."""
  def outputs(config):
    return (f"adapters in {os.path.join(config.out_dir, 'adapters')}, results in "
            f"{os.path.join(config.out_dir, 'results.json')}")
  argv = sys.argv[1:] if argv is None else list(argv)
  return loop.run_main(argv, config_from_argv=config_from_argv, train=train, outputs=outputs)


if __name__ == "__main__":
  from train import agd as _agd
  sys.exit(_agd.main())
