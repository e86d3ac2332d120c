"""Causal-LM pieces shared by the LM recipes (`train.lora`, `train.pretrain`): the tiny default
base, the next-token loss, the packed data stream of a config and the run's fingerprint.

References:
  transformers `ForCausalLMLoss` (the loss, with -100 labels ignored).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxadapt.adapters import lora as lora_lib
from jaxadapt.causal_lm import forward
from jaxadapt.models.llama import LlamaConfig
from train import data as data_lib
from train.loop import RunError

# The embedded default base: a tiny random Llama with a byte-level vocabulary.
TINY_LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=512)
TINY_LLAMA_SEED = 0


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


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
  """`causal_lm_loss` of a causal LM on a packed batch, as a hashable `loop.Trainer` loss.

  With `lora` the trainable tree is the LoRA/DoRA weights `{path: {a, b[, magnitude]}}` over the
  frozen base params; without, the trainable tree is the params themselves (frozen: `{}`).
  Equal losses (same graph, same adapter config) share one compiled step.
  """
  graphdef: Any                                # the model's nnx GraphDef
  lora: Optional[lora_lib.LoraConfig] = None   # the adapter's config; None = train the params
  dropout: bool = False                        # LoRA dropout with the step's rng

  def __call__(self, trainable, frozen, batch, rng):
    if self.lora is None:
      params, ctx = trainable, None
    else:
      adapter = lora_lib.LoraAdapter(weights=trainable, config=self.lora)
      params, ctx = frozen, lora_lib.context(adapter,
                                             dropout_key=rng if self.dropout else None)
    logits = forward(self.graphdef, params, batch["input_ids"], batch["attention_mask"], None,
                     ctx)
    return causal_lm_loss(logits, batch["labels"])


def build_data(config, vocab_size: int) -> data_lib.PackedStream:
  """The packed token stream of an LM recipe's config: `data` tokenized (the model dir's
  tokenizer, or bytes), or the synthetic corpus.

  Args:
    config: has `data`, `text_field`, `synthetic_docs`, `model_dir`, `seq_len`, `seed`.
    vocab_size: of the model; a token id past it is a RunError.
  """
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


def run_fingerprint(model_config: LlamaConfig, stream: data_lib.PackedStream) -> dict:
  """What a run trains on beyond its config: the model's architecture and a hash of the data.

  Saved in each checkpoint's record, so that a model dir or data file changed in place (same
  path, so the same config) is caught on resume.
  """
  digest = hashlib.sha256(stream.ids.tobytes())
  digest.update(stream.mask.tobytes())
  arch = json.loads(json.dumps(dataclasses.asdict(model_config), default=str))
  return {"model_config": arch, "data_chunks": stream.num_chunks,
          "data_sha256": digest.hexdigest()[:16]}


def check_batch_fields(config):
  """Raises ValueError unless `config.seq_len` allows next-token prediction and
  `config.batch_size` splits evenly over `config.data_parallel`."""
  if config.seq_len < 2:
    raise ValueError(f"seq_len must be >= 2 for next-token prediction, got {config.seq_len}")
  if config.batch_size % config.data_parallel:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by data_parallel="
                     f"{config.data_parallel} (each data shard gets the same number of rows)")
