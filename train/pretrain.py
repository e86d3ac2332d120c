"""Full-parameter training of a small causal LM base (every parameter trains), on a mesh.

  python -m train.pretrain [--config pretrain_tiny] [--model_dir HF_DIR] [--data corpus.txt] \
      [--out_dir runs/x] [--steps 500] [--hidden_size 128] [--config.data_parallel=2] ...

The second user of `train.loop.Trainer`, beside `train.lora`: the trainable tree is every
parameter of the base and the frozen tree is empty. The base starts from a random init of the
architecture in the config (by default the tiny byte-level Llama that `train.lora` fine-tunes),
or from a Hugging Face Llama/Mistral/Qwen2 dir (`--model_dir`: its weights, architecture and
tokenizer). Data as `train.lora`: a text file (a document per line), .jsonl/.json records, or
the synthetic corpus; byte-level without a tokenizer. Checkpoints, exact resume after a kill,
refused mismatched resumes and multi-host runs work as in `train.lora` (see `train/loop.py`).
At the end the trained base is written as a Hugging Face dir, `out_dir/model` (config.json +
model.safetensors, and the tokenizer of `--model_dir` if it has one), which `jaxadapt.load_model`
and transformers' `AutoModelForCausalLM` load; per-step losses are in `out_dir/metrics.jsonl`.

References:
  LLaMA (Touvron et al., 2023) for the architecture; AdamW (Loshchilov & Hutter, 2019) with
  decay on matrices only; cosine schedule with warmup (Loshchilov & Hutter, 2017).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxadapt import sharding as sharding_lib
from jaxadapt.causal_lm import CausalLM, load_model
from jaxadapt.io.hf import read_config, torch_name
from jaxadapt.models.llama import LlamaConfig
from jaxadapt.paths import keypath_str
from train import flags
from train import lm
from train import loop
from train.loop import RunError

# Fields that may differ between a run and its resume (they do not change the loss curve).
RESUMABLE_CHANGES = ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                     "data_parallel", "model_parallel")
# The architecture fields of a from-scratch model (a model dir brings its own).
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rope_theta", "tie_word_embeddings")
# Files of a model dir's tokenizer, copied into the exported dir.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
_TINY = lm.TINY_LLAMA


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  """Everything a pre-training run depends on; `train/configs/pretrain_*.py` return one."""
  model_dir: Optional[str] = None       # HF Llama/Mistral/Qwen2 dir to start from; None = random
  # The architecture of a model trained from scratch (a Llama); a model_dir brings its own.
  vocab_size: int = _TINY.vocab_size    # vocabulary (256 = UTF-8 bytes, no tokenizer)
  hidden_size: int = _TINY.hidden_size  # width of the residual stream
  intermediate_size: int = _TINY.intermediate_size  # width of the MLP
  num_hidden_layers: int = _TINY.num_hidden_layers  # decoder layers
  num_attention_heads: int = _TINY.num_attention_heads  # query heads
  num_key_value_heads: int = _TINY.num_key_value_heads  # key/value heads (< heads: GQA)
  head_dim: int = _TINY.head_dim        # width of a head
  max_position_embeddings: int = _TINY.max_position_embeddings  # longest sequence (rope)
  rope_theta: float = _TINY.rope_theta  # rope base frequency
  tie_word_embeddings: bool = _TINY.tie_word_embeddings  # lm_head shares the embedding
  data: Optional[str] = None            # text file (a document per line), .jsonl or .json
                                        # (objects with text_field); None = synthetic corpus
  text_field: str = "text"              # the field of .jsonl/.json records that holds the text
  synthetic_docs: int = 2000            # lines of the synthetic corpus (when data is None)
  out_dir: str = "runs/pretrain_tiny"   # checkpoints/, metrics.jsonl, model/ (HF dir) go here
  steps: int = 600                      # optimizer steps in the whole run
  batch_size: int = 16                  # global batch (sequences); divisible by data_parallel
  seq_len: int = 64                     # tokens per packed sequence
  learning_rate: float = 3e-3           # peak learning rate (after warmup)
  warmup_steps: int = 30                # linear warmup from 0 to learning_rate
  final_lr_fraction: float = 0.1        # cosine decays to learning_rate * this at the last step
  weight_decay: float = 0.1             # AdamW decoupled decay on matrices (not norms/biases)
  grad_clip: float = 1.0                # clip gradients to this global norm; 0 = no clipping
  seed: int = 0                         # random init and data order
  data_parallel: int = 1                # mesh 'data' axis: the batch is split over it
  model_parallel: int = 1               # mesh 'model' axis: Megatron-style tensor parallelism
  checkpoint_every: int = 100           # save params + optimizer state + data position
  keep_checkpoints: int = 2             # newest checkpoints kept on disk
  log_every: int = 10                   # fetch losses to the host / log / progress bar
  progress: bool = True                 # show the tqdm progress bar

  def __post_init__(self):
    loop.check_numbers(
        self, positive_ints=("steps", "batch_size", "seq_len", "data_parallel", "model_parallel",
                             "checkpoint_every", "keep_checkpoints", "log_every",
                             "synthetic_docs", "vocab_size", "hidden_size", "intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "max_position_embeddings"),
        ints=("warmup_steps", "seed"),
        finite=("learning_rate", "final_lr_fraction", "weight_decay", "grad_clip",
                "rope_theta"))
    lm.check_batch_fields(self)
    optimizer(self)  # validates the schedule and optimizer settings
    if self.model_dir is not None:
      changed = [f.name for f in dataclasses.fields(self)
                 if f.name in ARCHITECTURE and getattr(self, f.name) != f.default]
      if changed:
        raise ValueError(f"{changed} set the architecture of a model trained from scratch, but "
                         f"model_dir={self.model_dir!r} brings its own (its config.json). Drop "
                         f"those fields or model_dir.")
    else:
      self.model_config()  # validates the architecture (heads, ...)
      if self.seq_len > self.max_position_embeddings:
        raise ValueError(f"seq_len={self.seq_len} is longer than max_position_embeddings="
                         f"{self.max_position_embeddings}; raise max_position_embeddings or "
                         f"lower seq_len")

  def model_config(self) -> LlamaConfig:
    """The from-scratch architecture (a Llama)."""
    return LlamaConfig(model_type="llama", **{k: getattr(self, k) for k in ARCHITECTURE})

  def to_record(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class PretrainResult:
  """What `train` returns: the run's losses and the trained model."""
  losses: list            # loss of each step this call ran, in order
  first_step: int         # 1-based step of losses[0] (> 1 after a resume)
  model: CausalLM         # the trained base (params on the mesh)
  opt_state: Any          # the optimizer state (same shardings as the params)
  mesh: Any


def optimizer(config: PretrainConfig) -> loop.AdamW:
  """AdamW with warmup + cosine, after global-norm clipping; decay on matrices only."""
  return loop.AdamW(learning_rate=config.learning_rate, steps=config.steps,
                    warmup_steps=config.warmup_steps, final_lr_fraction=config.final_lr_fraction,
                    weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                    decay_mask=loop.decay_matrices)


def build_model(config: PretrainConfig, mesh) -> CausalLM:
  """The initial base on `mesh` (float32): loaded from `model_dir`, or randomly initialised."""
  if config.model_dir is None:
    model = CausalLM.random(config.model_config(), seed=config.seed)
    return CausalLM(model.config, model.graphdef, sharding_lib.shard_params(model.params, mesh))
  if not os.path.isdir(config.model_dir):
    raise FileNotFoundError(f"--model_dir {config.model_dir}: not a directory (expected a "
                            f"Hugging Face Llama/Mistral/Qwen2 dir with config.json)")
  return load_model(config.model_dir, dtype="float32", sharding=mesh)


def train(config: PretrainConfig, *, stop_after: Optional[int] = None,
          model: Optional[CausalLM] = None) -> PretrainResult:
  """Runs (or resumes) pre-training as `config` says; see the module docstring.

  Args:
    config: the run.
    stop_after: stop once this many steps are done, without the final export: a stand-in for
      killing the process (tests). Checkpoints already started are completed.
    model: the initial base instead of building one from `config` (copied onto the mesh; the
      given model is not modified).
  """
  try:
    mesh = sharding_lib.make_mesh(config.data_parallel, config.model_parallel)
  except ValueError as e:
    raise RunError(f"{e}; set --data_parallel x --model_parallel to at most the device "
                   f"count") from None
  with loop.Trainer(config.out_dir, steps=config.steps, checkpoint_every=config.checkpoint_every,
                    keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
                    progress=config.progress, desc="pretrain",
                    resumable=RESUMABLE_CHANGES) as trainer:
    trainer.check_resume({"config": config.to_record()})  # before the (slow) model load
    trainer.refuse_to_overwrite("model", "an exported model")
    if model is None:
      model = build_model(config, mesh)
      params = model.params
    else:  # a copy: the trainer donates the trainable buffers
      placed = sharding_lib.shard_params(model.params, mesh)
      params = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), placed)
    stream = lm.build_data(config, model.config.vocab_size)
    tx = optimizer(config)
    fit = trainer.fit(
        lm.NextTokenLoss(model.graphdef), tx, params, {},
        lambda position: stream.batch(position, config.batch_size), mesh=mesh,
        batch_size=config.batch_size, seed=config.seed,
        record={"config": config.to_record(), **lm.run_fingerprint(model.config, stream)},
        learning_rate=tx.schedule, stop_after=stop_after)

  trained = CausalLM(model.config, model.graphdef, fit.trainable)
  if stop_after is None:
    save_hf_model(trained, os.path.join(config.out_dir, "model"), source_dir=config.model_dir)
  return PretrainResult(losses=fit.losses, first_step=fit.first_step, model=trained,
                        opt_state=fit.opt_state, mesh=mesh)


# --- the Hugging Face export ---------------------------------------------------------------------

def hf_config(config: LlamaConfig) -> dict:
  """transformers' `config.json` of a plain Llama (`LlamaConfig.from_hf` reads it back).

  Raises:
    ValueError: for a feature this writer does not describe (another family, rope scaling,
      sliding windows, biases), naming it.
  """
  plain = LlamaConfig(model_type="llama", **{k: getattr(config, k) for k in (
      *ARCHITECTURE, "rms_norm_eps", "hidden_act")})
  if not any(config.sliding_windows):  # full attention in every layer, as () says
    plain = dataclasses.replace(plain, sliding_windows=config.sliding_windows)
  extra = [f.name for f in dataclasses.fields(config)
           if getattr(config, f.name) != getattr(plain, f.name)]
  if extra:
    raise ValueError(f"cannot write a config.json for this model: it differs from a plain "
                     f"Llama in {extra}; export it with source_dir= (the dir it was loaded from)")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_hidden_layers,
          "num_attention_heads": config.num_attention_heads,
          "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
          "max_position_embeddings": config.max_position_embeddings,
          "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "hidden_act": config.hidden_act, "tie_word_embeddings": config.tie_word_embeddings,
          "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


def save_hf_model(model: CausalLM, directory: str, *, source_dir: Optional[str] = None):
  """Writes `model` as a Hugging Face dir: config.json + model.safetensors (torch layout).

  Multi-host: every process must call it (the params are gathered); the chief writes.

  Args:
    model: a Llama-family `CausalLM` (params may be sharded).
    directory: created if needed; its config.json and model.safetensors are replaced.
    source_dir: the dir the model was loaded from: its config.json is kept as is (any family
      and feature) and its tokenizer files are copied. None: a plain Llama config is written.
  """
  from safetensors.numpy import save_file
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    host = multihost_utils.process_allgather(model.params, tiled=True)
  else:
    host = jax.device_get(model.params)
  if jax.process_index() != 0:
    return
  tensors = {}
  for kp, value in jax.tree_util.tree_flatten_with_path(host)[0]:
    # jaxadapt's loader name map, inverted: its layout transforms (transposes) are involutions.
    name, transform = torch_name(keypath_str(kp))
    value = np.asarray(value)
    tensors[name] = np.ascontiguousarray(transform(value) if transform else value)
  if source_dir is not None:
    config = read_config(source_dir)
  else:
    config = hf_config(model.config)
  dtypes = {str(v.dtype) for v in tensors.values()}
  config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else config.get("torch_dtype")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  for name in TOKENIZER_FILES if source_dir is not None else ():
    if os.path.exists(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(directory, name))


# --- command line --------------------------------------------------------------------------------

def config_from_argv(argv: Sequence[str]) -> PretrainConfig:
  """`--config NAME` (default pretrain_tiny) with field overrides, see `train.flags`."""
  return flags.config_from_argv(argv, default="pretrain_tiny", cls=PretrainConfig, doc=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.pretrain`."""
  def outputs(config):
    return (f"model (Hugging Face dir) in {os.path.join(config.out_dir, 'model')}, metrics in "
            f"{os.path.join(config.out_dir, 'metrics.jsonl')}")
  return loop.run_main(sys.argv[1:] if argv is None else list(argv),
                       config_from_argv=config_from_argv, train=train, outputs=outputs)


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.pretrain.PretrainConfig` is this class.
  from train import pretrain as _pretrain
  sys.exit(_pretrain.main())
