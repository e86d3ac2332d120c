"""LoRA (and DoRA) fine-tuning of a frozen causal LM with optax, on a (data, model) mesh.

  python -m train.lora [--config lora_tiny] [--model_dir HF_DIR] [--data corpus.txt] \
      [--out_dir runs/x] [--steps 200] [--config.data_parallel=4] ...
  jaxadapt train lora ARGS   (the same: `main(argv)`)

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID set (or JAXADAPT_DISTRIBUTED=1 where JAX detects the cluster); the mesh then
spans every host's devices (see `train/distributed.py`).

Only the adapter trains: the loss is differentiated with respect to the adapter weights pytree
(LoRA `a`, `b`, and DoRA `magnitude`) while the base params are a non-differentiated argument,
so no base gradient or optimizer state exists. The run checkpoints (orbax) every
`checkpoint_every` steps; rerunning the same command after a kill resumes from the latest
checkpoint and continues the identical loss curve: data order, dropout keys and the learning
rate are all pure functions of (seed, step). A checkpoint written with other settings, another
base architecture or other data is refused (`RunError`, naming what differs) before its state is
restored or anything is written. At the end the adapter is written as a PEFT dir
(`out_dir/adapter`) and the per-step losses are in `out_dir/metrics.jsonl`.

References:
  LoRA (Hu et al., 2021), Eq. 3; DoRA (Liu et al., 2024), Eq. 5; AdamW (Loshchilov & Hutter,
  2019); cosine schedule with warmup (Loshchilov & Hutter, 2017).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxadapt import sharding as sharding_lib
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters import targets as targets_lib
from jaxadapt.causal_lm import CausalLM, forward, load_model
from jaxadapt.io.peft import save_adapter
from jaxadapt.models.llama import LlamaConfig
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import distributed
from train import flags

# The embedded default base: a tiny random Llama with a byte-level vocabulary.
TINY_LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=512)
TINY_LLAMA_SEED = 0
# Fields that may differ between a run and its resume (they do not change the loss curve).
# Every linear layer including lm_head (PEFT's "all-linear" leaves the output layer out).
ALL_LINEAR_AND_HEAD = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "lm_head")
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                     "data_parallel", "model_parallel")


class RunError(ValueError):
  """A run that cannot start as configured (data, out_dir, resume, targets).

  Its message says what was expected, what was found and what to do; `main` prints it without a
  traceback.
  """


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything a LoRA run depends on; `train/configs/*.py` return one from `get_config()`."""
  model_dir: Optional[str] = None       # HF Llama/Mistral/Qwen2 dir; None = tiny random Llama
  data: Optional[str] = None            # text file (a document per line), .jsonl or .json
                                        # (objects with text_field); None = synthetic corpus
  text_field: str = "text"              # the field of .jsonl/.json records that holds the text
  synthetic_docs: int = 2000            # lines of the synthetic corpus (when data is None)
  out_dir: str = "runs/lora_tiny"       # checkpoints/, metrics.jsonl, adapter/ (PEFT) go here
  steps: int = 300                      # optimizer steps in the whole run
  batch_size: int = 16                  # global batch (sequences); divisible by data_parallel
  seq_len: int = 64                     # tokens per packed sequence
  learning_rate: float = 3e-3           # peak learning rate (after warmup)
  warmup_steps: int = 20                # linear warmup from 0 to learning_rate
  final_lr_fraction: float = 0.1        # cosine decays to learning_rate * this at the last step
  weight_decay: float = 0.0             # AdamW decoupled decay on lora a/b (not on magnitudes)
  grad_clip: float = 1.0                # clip gradients to this global norm; 0 = no clipping
  seed: int = 0                         # adapter init, data order and dropout keys
  lora_r: int = 16                      # LoRA rank
  lora_alpha: float = 32.0              # LoRA alpha (scale = alpha / r)
  target_modules: Union[str, tuple] = ALL_LINEAR_AND_HEAD  # names, a regex, or "all-linear"
  use_dora: bool = False                # DoRA: trains a magnitude vector per output too
  use_rslora: bool = False              # scale = alpha / sqrt(r)
  lora_dropout: float = 0.0             # dropout on the adapter input during training
  data_parallel: int = 1                # mesh 'data' axis: the batch is split over it
  model_parallel: int = 1               # mesh 'model' axis: Megatron-style tensor parallelism
  checkpoint_every: int = 100           # save adapter + optimizer state + data position
  keep_checkpoints: int = 2             # newest checkpoints kept on disk
  log_every: int = 10                   # fetch losses to the host / log / progress bar
  dtype: str = "float32"                # base dtype (float32/bfloat16); the adapter stays float32
  progress: bool = True                 # show the tqdm progress bar

  def __post_init__(self):
    tm = self.target_modules
    if isinstance(tm, (list, tuple)):
      object.__setattr__(self, "target_modules", tuple(tm))
    elif isinstance(tm, str) and ("," in tm or tm.isidentifier()):
      # From the command line: "q_proj,v_proj" or "q_proj" are module names, not a regex.
      object.__setattr__(self, "target_modules", tuple(t.strip() for t in tm.split(",")
                                                       if t.strip()))
    def is_int(v):
      return isinstance(v, int) and not isinstance(v, bool)
    for name in ("steps", "batch_size", "seq_len", "lora_r", "data_parallel", "model_parallel",
                 "checkpoint_every", "keep_checkpoints", "log_every", "synthetic_docs"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    for name in ("warmup_steps", "seed"):
      if not is_int(getattr(self, name)):
        raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
    for name in ("learning_rate", "final_lr_fraction", "weight_decay", "grad_clip", "lora_alpha",
                 "lora_dropout"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {self.seq_len}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got "
                       f"{self.warmup_steps}")
    if self.lora_alpha <= 0:
      raise ValueError(f"lora_alpha must be > 0 (the adapter's scale is alpha / r; 0 would "
                       f"train nothing), got {self.lora_alpha}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    if self.grad_clip < 0 or self.weight_decay < 0:
      raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, "
                       f"{self.weight_decay}")
    if self.batch_size % self.data_parallel:
      raise ValueError(f"batch_size={self.batch_size} must be divisible by data_parallel="
                       f"{self.data_parallel} (each data shard gets the same number of rows)")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    self.lora_config()  # validates r, dropout, targets

  def lora_config(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(
        r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=self.target_modules,
        use_dora=self.use_dora, use_rslora=self.use_rslora, lora_dropout=self.lora_dropout,
        base_model_name_or_path=self.model_dir)

  def to_record(self) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the run's losses and final state."""
  losses: list            # loss of each step this call ran, in order
  first_step: int         # 1-based step of losses[0] (> 1 after a resume)
  adapter: lora_lib.LoraAdapter  # the trained adapter (on the mesh)
  opt_state: Any          # the optimizer state (same shardings as the adapter)
  model: CausalLM         # the frozen base the run used (params on the mesh)
  mesh: Any


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy: `logits[:, t]` predicts `labels[:, t + 1]`.

  Args:
    logits: [B, S, V].
    labels: [B, S] token ids; `data.IGNORE` (-100) marks positions not trained on.
  Returns:
    [] float32, the mean over the trained positions (transformers' `ForCausalLMLoss`).
  """
  if logits.ndim != 3 or logits.shape[:2] != labels.shape:
    raise ValueError(f"causal_lm_loss needs logits [B, S, V] and labels [B, S]; got "
                     f"{logits.shape} and {labels.shape}")
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  valid = target != data_lib.IGNORE
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `final_lr_fraction` of it.

  With `warmup_steps == steps` the whole run is the warmup (optax's cosine part needs a step).
  """
  if config.warmup_steps >= config.steps:
    return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.steps, end_value=config.learning_rate * config.final_lr_fraction)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """AdamW with the schedule, after global-norm clipping; decay on LoRA a/b only."""
  def decay_mask(weights):
    return {p: {leaf: leaf != "magnitude" for leaf in w} for p, w in weights.items()}
  adamw = optax.adamw(learning_rate_schedule(config), weight_decay=config.weight_decay,
                      mask=decay_mask)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
  """The dropout key of a step: from (seed, step) alone, so a resumed run draws the same masks."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x0D), step)


def make_train_step(model: CausalLM, config: TrainConfig, tx: optax.GradientTransformation):
  """`step(weights, opt_state, params, batch, step) -> (weights, opt_state, loss)`, not jitted.

  The gradient is taken with respect to `weights` (the adapter pytree) only; `params` is an
  ordinary argument, so XLA never builds a base gradient.
  """
  lora_config = config.lora_config()
  graphdef = model.graphdef
  use_dropout = config.lora_dropout > 0

  def loss_fn(weights, params, batch, key):
    adapter = lora_lib.LoraAdapter(weights=weights, config=lora_config)
    ctx = lora_lib.contexts(adapter, dropout_key=key if use_dropout else None)
    logits = forward(graphdef, params, batch["input_ids"], batch["attention_mask"], None, ctx)
    return causal_lm_loss(logits, batch["labels"])

  def step(weights, opt_state, params, batch, step_index):
    loss, grads = jax.value_and_grad(loss_fn)(weights, params, batch,
                                              dropout_key(config.seed, step_index))
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss
  return step


def _sharding_tree(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def opt_state_shardings(tx, weights, mesh):
  """Shardings of `tx.init(weights)`: every adapter-shaped slot follows its adapter leaf."""
  shapes = jax.eval_shape(tx.init, weights)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, shapes, _sharding_tree(weights),
                               transform_non_params=lambda _: replicated)


# Fields that do not enter the compiled step: runs differing only in these share one executable.
_STEP_IRRELEVANT = dict(out_dir="", checkpoint_every=1, keep_checkpoints=1, log_every=1,
                        progress=False, data=None, synthetic_docs=1, model_dir=None)
_STEP_CACHE: dict = {}


def _jitted_step(model, config, tx, mesh, shardings):
  """The jitted train step, reused by later runs with the same graph, mesh and step settings.

  The shardings are a function of (graph, mesh), so the key need not include them. Reuse saves
  the XLA compile when a run is resumed or repeated in one process (tests, notebooks).
  """
  key = (model.graphdef, mesh, dataclasses.replace(config, **_STEP_IRRELEVANT))
  if key not in _STEP_CACHE:
    w_sh, o_sh, p_sh, batch_sh, replicated = shardings
    if len(_STEP_CACHE) >= 8:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = jax.jit(make_train_step(model, config, tx),
                               in_shardings=(w_sh, o_sh, p_sh, batch_sh, replicated),
                               out_shardings=(w_sh, o_sh, replicated), donate_argnums=(0, 1))
  return _STEP_CACHE[key]


def build_model(config: TrainConfig, mesh) -> CausalLM:
  """The frozen base on `mesh`: loaded from `model_dir`, or the tiny random Llama."""
  if config.model_dir is None:
    model = CausalLM.random(TINY_LLAMA, seed=TINY_LLAMA_SEED, dtype=jnp.dtype(config.dtype))
    return CausalLM(model.config, model.graphdef, sharding_lib.shard_params(model.params, mesh))
  if not os.path.isdir(config.model_dir):
    raise FileNotFoundError(f"--model_dir {config.model_dir}: not a directory (expected a "
                            f"Hugging Face Llama/Mistral/Qwen2 dir with config.json)")
  return load_model(config.model_dir, dtype=config.dtype, sharding=mesh)


def build_data(config: TrainConfig, vocab_size: int) -> data_lib.PackedStream:
  """The packed token stream: `data` tokenized (model dir tokenizer or bytes), or synthetic."""
  is_json = config.data is not None and config.data.lower().endswith((".json", ".jsonl"))
  if config.data is None:
    text = data_lib.synthetic_corpus(config.synthetic_docs, seed=0)
  else:
    if not os.path.isfile(config.data):
      raise FileNotFoundError(f"--data {config.data}: no such file (expected a UTF-8 text file, "
                              f".jsonl or .json)")
    try:
      if is_json:
        docs = data_lib.read_json_documents(config.data, config.text_field)
      else:
        with open(config.data, encoding="utf-8") as f:
          text = f.read()
    except UnicodeDecodeError as e:
      raise RunError(f"--data {config.data}: expected UTF-8 text, found the byte "
                     f"{e.object[e.start:e.start + 1]!r} at offset {e.start} that is not UTF-8. "
                     f"Convert the file to UTF-8 (e.g. iconv -t utf-8).") from None
    except ValueError as e:  # read_json_documents: the message names file, record and field
      raise RunError(f"--data {e}") from None
  tokens = (data_lib.tokenize_documents(docs, config.model_dir) if is_json else
            data_lib.tokenize(text, config.model_dir))
  if tokens.size < 2:
    where = f"--data {config.data}" if config.data else "the synthetic corpus"
    raise RunError(f"{where} gives {tokens.size} token(s); training needs at least 2 (one "
                   f"next-token target). Give a data file with some content.")
  if int(tokens.max()) >= vocab_size:
    how = ("its tokenizer" if data_lib.has_tokenizer(config.model_dir) else
           "UTF-8 bytes (no tokenizer in the model dir)")
    raise RunError(f"data tokenized with {how} has token id {int(tokens.max())}, but the model "
                     f"vocabulary has {vocab_size} entries. Put the model's tokenizer in its dir, "
                     f"or use a model with vocab_size >= 256 for byte-level data.")
  ids, mask = data_lib.pack(tokens, config.seq_len)
  return data_lib.PackedStream(ids=ids, mask=mask, seed=config.seed)


def run_fingerprint(model: CausalLM, stream: data_lib.PackedStream) -> dict:
  """What a run trains on beyond its config: the base's architecture and a hash of the data.

  Saved in each checkpoint's record, so that a model dir or data file changed in place (same
  path, so the same config) is caught on resume.
  """
  digest = hashlib.sha256(stream.ids.tobytes())
  digest.update(stream.mask.tobytes())
  arch = json.loads(json.dumps(dataclasses.asdict(model.config), default=str))
  return {"model_config": arch, "data_chunks": stream.num_chunks,
          "data_sha256": digest.hexdigest()[:16]}


def _check_resume(record: dict, config: TrainConfig, out_dir: str,
                  fingerprint: Optional[dict] = None):
  """Raises RunError unless the checkpoint in `out_dir` was written by this run's settings.

  Args:
    record: the checkpoint's JSON record.
    config: the run being started.
    out_dir: named in the error.
    fingerprint: `run_fingerprint` of this run; compared with the record's (when it has one).
  """
  saved = record.get("config", {})
  now = config.to_record()
  diff = {k: (saved.get(k), now[k]) for k in now
          if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]}
  if fingerprint is not None:
    for k, v in fingerprint.items():
      if k in record and record[k] != v:
        diff[k] = ("<as saved>" if k == "model_config" else record[k],
                   "<changed>" if k == "model_config" else v)
  if diff:
    raise RunError(f"{out_dir} has a checkpoint of a different run; resuming it with "
                   f"{ {k: v[1] for k, v in diff.items()} } (it was "
                   f"{ {k: v[0] for k, v in diff.items()} }) would not continue its loss "
                   f"curve. Use a new --out_dir, or the same settings and inputs.")


def _prepare_out_dir(out_dir: str):
  """Creates `out_dir` (if needed) and checks it is a writable directory."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise RunError(f"--out_dir {out_dir}: expected a directory (or a path to create), found a "
                   f"file. Pick another --out_dir.")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise RunError(f"--out_dir {out_dir}: cannot create it ({e.strerror}). Pick a writable "
                   f"--out_dir.") from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise RunError(f"--out_dir {out_dir}: the directory is not writable. Pick a writable "
                   f"--out_dir.")


def _check_targets(config: TrainConfig, linear_paths: Sequence[str]) -> list[str]:
  """The targeted paths; every listed module name must match some layer (a typo is an error)."""
  tm = config.target_modules
  if isinstance(tm, tuple):
    unmatched = [n for n in tm if not any(targets_lib.is_targeted(p, (n,)) for p in linear_paths)]
    if unmatched:
      names = sorted({p.rsplit(".", 1)[-1] for p in linear_paths})
      raise RunError(f"target_modules {unmatched} match no linear layer of the model; its "
                     f"linear layers are named {names}. Fix or drop those names.")
  try:
    return config.lora_config().targets(linear_paths)
  except ValueError as e:
    raise RunError(str(e)) from None


def train(config: TrainConfig, *, stop_after: Optional[int] = None,
          model: Optional[CausalLM] = None) -> TrainResult:
  """Runs (or resumes) LoRA training as `config` says; see the module docstring.

  Args:
    config: the run.
    stop_after: stop once this many steps are done, without the final export: a stand-in for
      killing the process (tests). Checkpoints already started are completed.
    model: a base to use instead of building one from `config` (its params are re-placed on the
      mesh; the given tree is not modified).
  """
  try:
    mesh = sharding_lib.make_mesh(config.data_parallel, config.model_parallel)
  except ValueError as e:
    raise RunError(f"{e}; set --data_parallel x --model_parallel to at most the device "
                   f"count") from None
  # The out_dir and any checkpoint in it are checked before the (slow) model load.
  _prepare_out_dir(config.out_dir)
  ckpts = ckpt_lib.Checkpoints(os.path.join(config.out_dir, "checkpoints"),
                               every=config.checkpoint_every, keep=config.keep_checkpoints)
  try:
    return _train(config, mesh, ckpts, stop_after, model)
  finally:
    ckpts.close()


def _train(config, mesh, ckpts, stop_after, model) -> TrainResult:
  """`train` once the mesh and the checkpoint manager exist (the caller closes the manager)."""
  start = ckpts.latest_step() or 0
  if start:
    _check_resume(ckpts.record(start), config, config.out_dir)
  elif os.path.exists(os.path.join(config.out_dir, "adapter")):
    raise RunError(f"--out_dir {config.out_dir} holds an exported adapter but no checkpoint to "
                   f"resume; a new run would overwrite it. Use a new --out_dir, or move the "
                   f"adapter away.")
  if model is None:
    model = build_model(config, mesh)
  else:
    model = CausalLM(model.config, model.graphdef,
                     sharding_lib.shard_params(model.params, mesh))
  stream = build_data(config, model.config.vocab_size)
  fingerprint = run_fingerprint(model, stream)
  lora_config = config.lora_config()
  _check_targets(config, model.linear_paths)

  weights = lora_lib.init_lora(model.params, model.linear_paths, lora_config,
                               jax.random.key(config.seed), dtype=jnp.float32).weights
  weights = sharding_lib.shard_adapter_weights(weights, mesh)
  tx = optimizer(config)
  w_sh = _sharding_tree(weights)
  o_sh = opt_state_shardings(tx, weights, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(weights)
  p_sh = _sharding_tree(model.params)
  batch_sh = NamedSharding(mesh, P(sharding_lib.DATA, None))
  replicated = NamedSharding(mesh, P())
  step_fn = _jitted_step(model, config, tx, mesh, (w_sh, o_sh, p_sh, batch_sh, replicated))

  if start:
    record = ckpts.record(start)
    _check_resume(record, config, config.out_dir, fingerprint)
    state, _ = ckpts.restore(start, {"weights": weights, "opt_state": opt_state})
    weights, opt_state = state["weights"], state["opt_state"]
    position = int(record["examples_seen"])
  else:
    position = 0
  chief = jax.process_index() == 0  # multi-host: one process writes the log and the export
  log = (ckpt_lib.MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"), resume_step=start)
         if chief else None)
  schedule = learning_rate_schedule(config)
  end = config.steps if stop_after is None else min(config.steps, stop_after)

  from tqdm.auto import tqdm
  bar = tqdm(total=config.steps, initial=start, desc="lora", unit="step",
             disable=not (config.progress and chief), dynamic_ncols=True)
  losses, pending = [], []

  def flush():
    if not pending:
      return
    values = jax.device_get([l for _, l in pending])
    rows = [{"step": s, "loss": float(v), "learning_rate": float(schedule(s - 1)),
             "time": time.time()} for (s, _), v in zip(pending, values)]
    if log is not None:
      log.write(rows)
    losses.extend(r["loss"] for r in rows)
    bar.update(len(rows))
    bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
    pending.clear()

  batch_shape = (config.batch_size, config.seq_len)
  try:
    for step in range(start, end):
      host = stream.batch(position, config.batch_size)
      batch = {k: jax.make_array_from_callback(batch_shape, batch_sh, lambda i, v=v: v[i])
               for k, v in host.items()}
      weights, opt_state, loss = step_fn(weights, opt_state, model.params, batch,
                                         jnp.asarray(step, jnp.int32))
      position += config.batch_size
      pending.append((step + 1, loss))
      done = step + 1
      last = done == config.steps
      if len(pending) >= config.log_every or done % config.checkpoint_every == 0 or last:
        flush()
      record = {"step": done, "examples_seen": position, "config": config.to_record(),
                **fingerprint}
      ckpts.save(done, {"weights": weights, "opt_state": opt_state}, record, force=last)
    flush()
  finally:
    bar.close()
    ckpts.wait()

  adapter = lora_lib.LoraAdapter(weights=weights, config=lora_config)
  if stop_after is None and chief:
    save_adapter(jax.device_get(adapter), os.path.join(config.out_dir, "adapter"))
  return TrainResult(losses=losses, first_step=start + 1, adapter=adapter, opt_state=opt_state,
                     model=model, mesh=mesh)


def config_from_argv(argv: Sequence[str]) -> TrainConfig:
  """`--config NAME` (default lora_tiny) with field overrides, see `train.flags`."""
  name, rest = flags.split_config_flag(argv)
  config = flags.load_config_module(name or "lora_tiny")
  if not isinstance(config, TrainConfig):
    raise flags.FlagError(f"--config {name}: get_config() returned {type(config).__name__}, "
                          f"expected train.lora.TrainConfig")
  if any(a in ("-h", "--help") for a in rest):
    print(__doc__.split("\n\n")[0] + "\n\n" + flags.help_text(config))
    raise SystemExit(0)
  return flags.apply_overrides(config, rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.lora` and `jaxadapt train lora`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    config = config_from_argv(argv)
    distributed.initialize_from_env()  # multi-host: before any JAX computation
  except (flags.FlagError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    result = train(config)
  except (FileNotFoundError, RunError) as e:  # e.g. a wrong --data: no traceback needed
    print(f"error: {e}", file=sys.stderr)
    return 2
  where = (f"adapter (PEFT) in {os.path.join(config.out_dir, 'adapter')}, metrics in "
           f"{os.path.join(config.out_dir, 'metrics.jsonl')}")
  if result.losses:
    print(f"steps {result.first_step}..{config.steps}: loss {result.losses[0]:.4f} -> "
          f"{result.losses[-1]:.4f}; {where}")
  else:
    print(f"{config.out_dir} already finished all {config.steps} steps; {where}")
  return 0


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.lora.TrainConfig` is this class.
  from train import lora as _lora
  sys.exit(_lora.main())
