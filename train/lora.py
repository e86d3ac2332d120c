"""LoRA (and DoRA) fine-tuning of a frozen causal LM with optax, on a (data, model) mesh.

  python -m train.lora [--config lora_tiny] [--model_dir HF_DIR] [--data corpus.txt] \
      [--out_dir runs/x] [--steps 200] [--config.data_parallel=4] ...
  jaxadapt train lora ARGS   (the same: `main(argv)`)

Multi-host: run the same command on every host with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID set (or JAXADAPT_DISTRIBUTED=1 where JAX detects the cluster); the mesh then
spans every host's devices (see `train/distributed.py`).

Only the adapter trains (a thin user of `train.loop.Trainer`): the loss is differentiated with
respect to the adapter weights pytree (LoRA `a`, `b`, and DoRA `magnitude`) while the base params
are a non-differentiated argument, so no base gradient or optimizer state exists. The run
checkpoints (orbax) every `checkpoint_every` steps; rerunning the same command after a kill
resumes from the latest checkpoint and continues the identical loss curve: data order, dropout
keys and the learning rate are all pure functions of (seed, step). A checkpoint written with
other settings, another base architecture or other data is refused (`RunError`, naming what
differs) before its state is restored or anything is written. At the end the adapter is written
as a PEFT dir (`out_dir/adapter`) and the per-step losses are in `out_dir/metrics.jsonl`.

References:
  LoRA (Hu et al., 2021), Eq. 3; DoRA (Liu et al., 2024), Eq. 5; AdamW (Loshchilov & Hutter,
  2019); cosine schedule with warmup (Loshchilov & Hutter, 2017).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from jaxadapt import sharding as sharding_lib
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.adapters import targets as targets_lib
from jaxadapt.causal_lm import CausalLM, load_model
from jaxadapt.io.peft import save_adapter
from train import data as data_lib
from train import flags
from train import lm
from train import loop
from train.lm import TINY_LLAMA, TINY_LLAMA_SEED, causal_lm_loss  # noqa: F401 (public names)
from train.loop import RunError

# Every linear layer including lm_head (PEFT's "all-linear" leaves the output layer out).
ALL_LINEAR_AND_HEAD = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "lm_head")
# Fields that may differ between a run and its resume (they do not change the loss curve).
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                     "data_parallel", "model_parallel")


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
    loop.check_numbers(
        self, positive_ints=("steps", "batch_size", "seq_len", "lora_r", "data_parallel",
                             "model_parallel", "checkpoint_every", "keep_checkpoints",
                             "log_every", "synthetic_docs"),
        ints=("warmup_steps", "seed"),
        finite=("learning_rate", "final_lr_fraction", "weight_decay", "grad_clip", "lora_alpha",
                "lora_dropout"))
    lm.check_batch_fields(self)
    if self.lora_alpha <= 0:
      raise ValueError(f"lora_alpha must be > 0 (the adapter's scale is alpha / r; 0 would "
                       f"train nothing), got {self.lora_alpha}")
    optimizer(self)  # validates the schedule and optimizer settings
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


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `final_lr_fraction` of it."""
  return optimizer(config).schedule


def decay_mask(weights):
  """AdamW's weight-decay mask: LoRA `a` and `b` decay, DoRA magnitudes do not."""
  return {p: {leaf: leaf != "magnitude" for leaf in w} for p, w in weights.items()}


def optimizer(config: TrainConfig) -> loop.AdamW:
  """AdamW with the schedule, after global-norm clipping; decay on LoRA a/b only."""
  return loop.AdamW(learning_rate=config.learning_rate, steps=config.steps,
                    warmup_steps=config.warmup_steps, final_lr_fraction=config.final_lr_fraction,
                    weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                    decay_mask=decay_mask)


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
  """The dropout key of a step: from (seed, step) alone, so a resumed run draws the same masks.

  It is the trainer's per-step rng (`loop.step_rng`), which the loss receives.
  """
  return loop.step_rng(seed, step)


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
  return lm.build_data(config, vocab_size)


def run_fingerprint(model: CausalLM, stream: data_lib.PackedStream) -> dict:
  """What a run trains on beyond its config: the base's architecture and a hash of the data."""
  return lm.run_fingerprint(model.config, stream)


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
  with loop.Trainer(config.out_dir, steps=config.steps, checkpoint_every=config.checkpoint_every,
                    keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
                    progress=config.progress, desc="lora",
                    resumable=RESUMABLE_CHANGES) as trainer:
    trainer.check_resume({"config": config.to_record()})
    trainer.refuse_to_overwrite("adapter", "an exported adapter")
    if model is None:
      model = build_model(config, mesh)
    else:
      model = CausalLM(model.config, model.graphdef,
                       sharding_lib.shard_params(model.params, mesh))
    stream = build_data(config, model.config.vocab_size)
    lora_config = config.lora_config()
    _check_targets(config, model.linear_paths)
    weights = lora_lib.init_lora(model.params, model.linear_paths, lora_config,
                                 jax.random.key(config.seed), dtype=jnp.float32).weights
    weights = sharding_lib.shard_adapter_weights(weights, mesh)
    loss = lm.NextTokenLoss(model.graphdef, lora=lora_config, dropout=config.lora_dropout > 0)
    tx = optimizer(config)
    fit = trainer.fit(
        loss, tx, weights, model.params, lambda position: stream.batch(position,
                                                                       config.batch_size),
        mesh=mesh, batch_size=config.batch_size, seed=config.seed,
        record={"config": config.to_record(), **run_fingerprint(model, stream)},
        learning_rate=tx.schedule, stop_after=stop_after)

  adapter = lora_lib.LoraAdapter(weights=fit.trainable, config=lora_config)
  if stop_after is None and jax.process_index() == 0:  # multi-host: the chief exports
    save_adapter(jax.device_get(adapter), os.path.join(config.out_dir, "adapter"))
  return TrainResult(losses=fit.losses, first_step=fit.first_step, adapter=adapter,
                     opt_state=fit.opt_state, model=model, mesh=mesh)


def config_from_argv(argv: Sequence[str]) -> TrainConfig:
  """`--config NAME` (default lora_tiny) with field overrides, see `train.flags`."""
  return flags.config_from_argv(argv, default="lora_tiny", cls=TrainConfig, doc=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.lora` and `jaxadapt train lora`."""
  def outputs(config):
    return (f"adapter (PEFT) in {os.path.join(config.out_dir, 'adapter')}, metrics in "
            f"{os.path.join(config.out_dir, 'metrics.jsonl')}")
  return loop.run_main(sys.argv[1:] if argv is None else list(argv),
                       config_from_argv=config_from_argv, train=train, outputs=outputs)


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.lora.TrainConfig` is this class.
  from train import lora as _lora
  sys.exit(_lora.main())
