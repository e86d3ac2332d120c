"""jaxadapt models out to diffusers / transformers folders, without torch.

The inverse of the loaders (`jaxadapt.io.hf.load_tree` with a family's name map): a params pytree
becomes a safetensors file in torch layout (linear `[out, in]`, conv OIHW) under the checkpoint
names, next to a `config.json` that both jaxadapt and the torch libraries read back. On top of
that, a CLIP BPE tokenizer over a small word list and a whole `StableDiffusionPipeline` folder, so
that a Stable-Diffusion-style model trained here (pixel space when it has no VAE) loads with
`jaxadapt.load_pipeline` and with diffusers' `StableDiffusionPipeline.from_pretrained`.

```python
from jaxadapt.io import diffusers_save as ds
words = ["a", "photo", "of", "sks", "face"]
text = CLIPTextEncoder.random(CLIPTextConfig(vocab_size=len(ds.clip_vocab(words)),
                                             eos_token_id=ds.CLIP_EOS_ID, ...))
ds.save_sd_pipeline("out/pipe", unet=unet, text_encoder=text, tokenizer_words=words,
                    scheduler_config={"_class_name": "DDIMScheduler", ...})
```

Multi-host: every process calls the writers (parameters are gathered); process 0 writes.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Callable, Optional

import jax
import numpy as np

from jaxadapt.io.hf import torch_name, torch_to_jax_layout
from jaxadapt.paths import keypath_str

DIFFUSERS_VERSION = "0.30.0"  # the `_diffusers_version` written; diffusers reads older folders
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_BOS_ID = 0  # ids of the special tokens in `clip_vocab` (the text config's eos_token_id)
CLIP_EOS_ID = 1
# transformers 4.x nests CLIPTextModel under `text_model.`; 5.x loads such names too, and
# Stable Diffusion's text_encoder/ ships them so.
CLIP_PREFIX = "text_model."


def jax_to_torch_layout(a: np.ndarray) -> np.ndarray:
  """The inverse of `jaxadapt.io.hf.torch_to_jax_layout`: `[in, out]` -> `[out, in]`, HWIO ->
  OIHW."""
  if a.ndim == 2:
    return a.T
  if a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  raise ValueError(f"expected a 2-D linear or 4-D conv kernel, got shape {tuple(a.shape)}")


def _host_params(params):
  """The params on this host as numpy (gathered from every process when multi-host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def _write_json(obj: dict, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)


def save_model_dir(params, directory: str, config_json: dict, *,
                   stem: str = "diffusion_pytorch_model",
                   name_fn: Callable[[str], tuple[str, Optional[Callable]]] = torch_name) -> None:
  """Writes a params pytree as a Hugging Face model dir: `{stem}.safetensors` + config.json.

  Each leaf is named by `name_fn` (the loader's map, e.g. `jaxadapt.io.hf.torch_name`) and put
  back in torch layout (float32), so the family's `load_*` and the torch library both read it.

  Args:
    params: the model's params (a pure dict pytree), possibly sharded over processes.
    directory: the dir to write (created).
    config_json: the `config.json` content.
    stem: file stem ("diffusion_pytorch_model" for diffusers, "model" for transformers).
    name_fn: dotted param path -> (checkpoint name, `torch_to_jax_layout` or None).

  Raises:
    ValueError: `name_fn` gives a layout transform other than `torch_to_jax_layout` (no
      inverse is known), or two params map to one checkpoint name.
  """
  from safetensors.numpy import save_file
  host = _host_params(params)
  if jax.process_index() != 0:
    return
  tensors = {}
  for kp, value in jax.tree_util.tree_flatten_with_path(host)[0]:
    path = keypath_str(kp)
    name, transform = name_fn(path)
    if transform is not None and transform is not torch_to_jax_layout:
      raise ValueError(f"save_model_dir: {path} maps to {name!r} with the layout transform"
                       f" {getattr(transform, '__name__', transform)!r}; only"
                       " torch_to_jax_layout (or none) can be inverted.")
    if name in tensors:
      raise ValueError(f"save_model_dir: two params map to the checkpoint name {name!r}"
                       f" (the second is {path}); check name_fn.")
    value = np.asarray(value, np.float32)
    tensors[name] = np.ascontiguousarray(jax_to_torch_layout(value) if transform else value)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, f"{stem}.safetensors"), metadata={"format": "pt"})
  _write_json(config_json, os.path.join(directory, "config.json"))


# ----------------------------------------------------------------------------- U-Net, VAE

def _one_or_list(values) -> int | list:
  """diffusers' per-block option: one value when every block has it, else the list."""
  values = list(values)
  return values[0] if len(set(values)) == 1 else values


def unet_config_json(config) -> dict:
  """diffusers' `UNet2DConditionModel` config.json of a `UNetConfig` (`UNetConfig.from_config`
  reads it back). The prediction type is the scheduler's option, not written here."""
  c = config
  size = c.sample_size
  return {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
      "sample_size": list(size) if isinstance(size, (tuple, list)) else size,
      "in_channels": c.in_channels, "out_channels": c.out_channels,
      "center_input_sample": c.center_input_sample, "flip_sin_to_cos": c.flip_sin_to_cos,
      "freq_shift": c.freq_shift, "down_block_types": list(c.down_block_types),
      "mid_block_type": c.mid_block_type, "up_block_types": list(c.up_block_types),
      "block_out_channels": list(c.block_out_channels),
      "layers_per_block": _one_or_list(c.layers_per_block),
      "downsample_padding": c.downsample_padding,
      "mid_block_scale_factor": c.mid_block_scale_factor, "act_fn": c.act_fn,
      "norm_num_groups": c.norm_num_groups, "norm_eps": c.norm_eps,
      "cross_attention_dim": _one_or_list(c.cross_attention_dim),
      "transformer_layers_per_block": _one_or_list(c.transformer_layers_per_block),
      # diffusers' historical name: it is the number of heads per block (as UNetConfig).
      "attention_head_dim": _one_or_list(c.attention_head_dim),
      "use_linear_projection": c.use_linear_projection,
      "upcast_attention": c.upcast_attention, "time_embedding_dim": c.time_embedding_dim,
      "conv_in_kernel": c.conv_in_kernel, "conv_out_kernel": c.conv_out_kernel,
  }


def save_unet(unet, directory: str) -> None:
  """Writes a `jaxadapt.models.unet.UNet` as a diffusers `UNet2DConditionModel` dir."""
  save_model_dir(unet.params, directory, unet_config_json(unet.config))


def vae_config_json(config) -> dict:
  """diffusers' `AutoencoderKL` config.json of a `VAEConfig` (`VAEConfig.from_config` reads it
  back)."""
  c = config
  n = len(c.block_out_channels)
  cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
         "in_channels": c.in_channels, "out_channels": c.out_channels,
         "down_block_types": ["DownEncoderBlock2D"] * n,
         "up_block_types": ["UpDecoderBlock2D"] * n,
         "block_out_channels": list(c.block_out_channels),
         "layers_per_block": c.layers_per_block, "act_fn": c.act_fn,
         "latent_channels": c.latent_channels, "norm_num_groups": c.norm_num_groups,
         "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor,
         "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_post_quant_conv,
         "mid_block_add_attention": c.mid_block_add_attention}
  if c.latents_mean is not None:
    cfg.update(latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))
  return cfg


def save_vae(vae, directory: str) -> None:
  """Writes a `jaxadapt.models.vae.VAE` as a diffusers `AutoencoderKL` dir."""
  save_model_dir(vae.params, directory, vae_config_json(vae.config))


# ----------------------------------------------------------------------------- CLIP text

def clip_text_config_json(config, *, bos_token_id: int = CLIP_BOS_ID,
                          pad_token_id: int = CLIP_EOS_ID) -> dict:
  """transformers' `CLIPTextModel` config.json of a `CLIPTextConfig` (`CLIPTextConfig.from_config`
  reads it back). `bos_token_id` / `pad_token_id` are the tokenizer's (unused by the model)."""
  c = config
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
          "num_attention_heads": c.num_attention_heads,
          "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
          "layer_norm_eps": c.layer_norm_eps, "attention_dropout": 0.0,
          "bos_token_id": bos_token_id, "eos_token_id": c.eos_token_id,
          "pad_token_id": pad_token_id, "dtype": "float32"}


def save_clip_text(encoder, directory: str) -> None:
  """Writes a `jaxadapt.models.clip.CLIPTextEncoder` as a transformers `CLIPTextModel` dir
  (config.json + model.safetensors, names under `text_model.` as Stable Diffusion ships them);
  `load_clip_text` and `transformers.CLIPTextModel.from_pretrained` read it."""
  def name_fn(path):
    name, transform = torch_name(path)
    return CLIP_PREFIX + name, transform
  save_model_dir(encoder.params, directory, clip_text_config_json(encoder.config), stem="model",
                 name_fn=name_fn)


# ----------------------------------------------------------------------------- CLIP tokenizer

# CLIP's byte-level BPE maps the printable ASCII bytes "!".."~" to themselves; the vocabulary
# holds each as a word-inner symbol and as a word end ("a</w>").
_BASE_SYMBOLS = tuple(chr(b) for b in range(ord("!"), ord("~") + 1))
_WORD = re.compile(r"[a-z]+|[0-9]")  # one piece of CLIP's pre-tokenizer (letters; one digit)


def _bpe(word: str, ranks: Mapping[tuple[str, str], int]) -> tuple[str, ...]:
  """The symbols CLIP's BPE leaves of one pre-tokenized word: start from its characters (the
  last marked `</w>`), then merge the lowest-ranked adjacent pair, every occurrence left to
  right, until no pair is a merge."""
  symbols = list(word[:-1]) + [word[-1] + "</w>"]
  while len(symbols) > 1:
    pairs = set(zip(symbols, symbols[1:]))
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return tuple(symbols)


def clip_merges(words: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges, in rank order, under which CLIP's BPE turns each word into one token.

  Each round runs the BPE over every word with the merges so far and, for a word left in
  several symbols, appends the merge of its first two; a merge appended last applies only when
  no earlier one does, so words already whole stay whole. Stops when every word is one token.

  Raises:
    ValueError: a word is not lower-case letters (or one digit), the pieces CLIP keeps whole.
  """
  words = list(dict.fromkeys(words))
  bad = [w for w in words if not isinstance(w, str) or not _WORD.fullmatch(w)]
  if bad:
    raise ValueError(f"tokenizer words must be lower-case letters a-z (or a single digit), each"
                     f" one CLIP pre-tokenizer piece; got {bad[:5]}.")
  merges: list[tuple[str, str]] = []
  ranks: dict[tuple[str, str], int] = {}
  while True:
    added = False
    for w in words:
      symbols = _bpe(w, ranks)
      if len(symbols) > 1:
        pair = (symbols[0], symbols[1])
        ranks[pair] = len(merges)
        merges.append(pair)
        added = True
    if not added:
      return merges


def clip_vocab(words: Sequence[str]) -> dict[str, int]:
  """{token: id} of the tokenizer `write_clip_tokenizer(words, ...)` writes.

  `<|startoftext|>` is `CLIP_BOS_ID` (0), `<|endoftext|>` `CLIP_EOS_ID` (1, also padding and
  unknown), then the printable ASCII symbols, the same as word ends (`a</w>`), then each merge's
  result. `len(clip_vocab(words))` is the text encoder's `vocab_size`.
  """
  tokens = [CLIP_BOS, CLIP_EOS, *_BASE_SYMBOLS, *(s + "</w>" for s in _BASE_SYMBOLS)]
  tokens += [a + b for a, b in clip_merges(words)]
  return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def write_clip_tokenizer(words: Sequence[str], directory: str, *,
                         max_length: int = 77) -> dict[str, int]:
  """Writes a CLIP BPE tokenizer dir that encodes each of `words` as one token.

  vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as CLIP ships
  them, read by `transformers.CLIPTokenizer.from_pretrained(directory)`. Other lower-case text
  still tokenizes (into smaller pieces, down to single characters).

  Args:
    words: lower-case words (a-z), or single digits; duplicates are ignored.
    directory: the dir to write (created).
    max_length: the tokenizer's `model_max_length` (prompts are padded/truncated to it; at most
      the text encoder's `max_position_embeddings`).

  Returns:
    The vocabulary {token: id} (`clip_vocab(words)`).
  """
  vocab = clip_vocab(words)
  merges = clip_merges(words)
  if jax.process_index() != 0:
    return vocab
  os.makedirs(directory, exist_ok=True)
  _write_json(vocab, os.path.join(directory, "vocab.json"))
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS,
             "pad_token": CLIP_EOS}
  _write_json(special, os.path.join(directory, "special_tokens_map.json"))
  _write_json({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
               "do_lower_case": True, "errors": "replace", "add_prefix_space": False},
              os.path.join(directory, "tokenizer_config.json"))
  return vocab


# ----------------------------------------------------------------------------- pipeline

def save_sd_pipeline(directory: str, *, unet, text_encoder, tokenizer_words: Sequence[str],
                     scheduler_config: Mapping, vae=None,
                     tokenizer_max_length: Optional[int] = None) -> None:
  """Writes a diffusers `StableDiffusionPipeline` folder.

  unet/, text_encoder/, tokenizer/, scheduler/ and model_index.json, plus vae/ when `vae` is
  given. Without one, model_index.json says `"vae": [null, null]`: a pixel-space pipeline whose
  U-Net samples are the images in [-1, 1] (`jaxadapt.load_pipeline` reads it; diffusers'
  `StableDiffusionPipeline.from_pretrained(directory, vae=None, safety_checker=None,
  feature_extractor=None, image_encoder=None)` with `output_type="latent"` samples the same).

  Args:
    directory: the folder to write (created).
    unet: a `jaxadapt.models.unet.UNet`.
    text_encoder: a `jaxadapt.models.clip.CLIPTextEncoder` over `clip_vocab(tokenizer_words)`
      (its `vocab_size` at least that vocabulary's size, `eos_token_id` = `CLIP_EOS_ID`).
    tokenizer_words: the words the tokenizer keeps whole (`write_clip_tokenizer`).
    scheduler_config: a diffusers scheduler config dict with `_class_name` (e.g.
      `{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", ...}`); the U-Net's
      prediction type belongs here.
    vae: a `jaxadapt.models.vae.VAE`, or None for pixel space.
    tokenizer_max_length: prompt length in tokens; default the text encoder's
      `max_position_embeddings`.

  Raises:
    ValueError: the parts do not fit together (naming what was expected and found).
  """
  cfg = text_encoder.config
  n_vocab = len(clip_vocab(tokenizer_words))
  if cfg.vocab_size < n_vocab or cfg.eos_token_id != CLIP_EOS_ID:
    raise ValueError(f"save_sd_pipeline: the text encoder must have vocab_size >= {n_vocab}"
                     f" (clip_vocab(tokenizer_words)) and eos_token_id={CLIP_EOS_ID}; got"
                     f" vocab_size={cfg.vocab_size}, eos_token_id={cfg.eos_token_id}.")
  max_length = tokenizer_max_length or cfg.max_position_embeddings
  if max_length > cfg.max_position_embeddings:
    raise ValueError(f"save_sd_pipeline: tokenizer_max_length={max_length} exceeds the text"
                     f" encoder's max_position_embeddings ({cfg.max_position_embeddings}).")
  if set(unet.config.cross_attention_dim) != {cfg.hidden_size}:
    raise ValueError(f"save_sd_pipeline: the U-Net's cross_attention_dim"
                     f" {unet.config.cross_attention_dim} must equal the text encoder's"
                     f" hidden_size ({cfg.hidden_size}).")
  channels = unet.config.in_channels if vae is None else vae.config.latent_channels
  if vae is None and unet.config.in_channels not in (1, 3, 4):
    raise ValueError(f"save_sd_pipeline: a pixel-space U-Net's channels are the image's (1, 3"
                     f" or 4); got in_channels={unet.config.in_channels}.")
  if unet.config.in_channels != channels:
    raise ValueError(f"save_sd_pipeline: the U-Net has in_channels={unet.config.in_channels},"
                     f" the VAE latent_channels={channels}; they must be equal.")
  if not isinstance(scheduler_config, Mapping) or "_class_name" not in scheduler_config:
    raise ValueError("save_sd_pipeline: scheduler_config must be a diffusers scheduler config"
                     " dict with '_class_name' (e.g. 'DDIMScheduler'); got"
                     f" {type(scheduler_config).__name__}"
                     f"{'' if not isinstance(scheduler_config, Mapping) else ' without it'}.")
  path = lambda *p: os.path.join(directory, *p)  # noqa: E731
  save_unet(unet, path("unet"))
  save_clip_text(text_encoder, path("text_encoder"))
  if vae is not None:
    save_vae(vae, path("vae"))
  write_clip_tokenizer(tokenizer_words, path("tokenizer"), max_length=max_length)
  if jax.process_index() != 0:
    return
  os.makedirs(path("scheduler"), exist_ok=True)
  _write_json({**dict(scheduler_config), "_diffusers_version": DIFFUSERS_VERSION},
              path("scheduler", "scheduler_config.json"))
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
           "feature_extractor": [None, None], "image_encoder": [None, None],
           "requires_safety_checker": False, "safety_checker": [None, None],
           "scheduler": ["diffusers", scheduler_config["_class_name"]],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None]}
  _write_json(index, path("model_index.json"))
