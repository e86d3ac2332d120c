"""Text generation for the Llama family: a prefill, then a jitted decode loop over a KV cache.

```python
out = model.generate("[reverse] hello\\n", max_new_tokens=16, adapter=adapter)
out.text[0], out.ids[0], out.finish_reasons[0]
out = model.generate(ids, attention_mask=mask, adapters=[a0, a1], adapter_ids=[0, 1, -1],
                     temperature=0.8, top_p=0.9, seed=1, stop=["\\n"])
```

How it runs: the prompts are left-padded into a preallocated `KVCache` in the forward context
(`jaxadapt.context`); one jitted prefill writes them and samples the first token; one jitted
decode loop (`lax.while_loop`, one token per step for every row, stopping when every row has
finished) produces the rest. Shapes are bucketed (rows to a power of two, the prompt to a power
of two >= 16, the cache to a power of two >= prompt bucket + max_new_tokens), so a stream of
calls with varying prompts compiles a bounded number of times: once per (rows, prompt, cache)
bucket for the prefill and once per (rows, cache) bucket for the loop. Sampling parameters,
seeds and the eos set are traced per row, never compile-time constants. Stop strings are checked
on the host between chunks of `stop_check_every` decode steps.

Semantics follow transformers' `generate` (greedy output equals it token for token): positions
count real tokens only (left padding does not shift them), eos ends a row, and sampling applies
temperature, then top-k, then top-p (nucleus: keep the smallest set of most likely tokens whose
probability reaches `top_p`), as its logits warpers do in that order.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.context import Context, KVCache
from jaxadapt.models.frozen import apply

MIN_PROMPT_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class GenerateOutput:
  """What `generate` returns, one entry per prompt (a single prompt is a batch of one).

  Attributes:
    ids: the new token ids of each row; eos, when it ended the row, is the last id, and a stop
      string's row ends with the token that completed it (as transformers).
    text: the decoded new text of each row (special tokens skipped, cut before a stop
      string), or None when the model has no tokenizer.
    finish_reasons: "stop" (eos or a stop string) or "length" (max_new_tokens reached).
    prompt_lengths: tokens in each prompt (padding excluded).
  """
  ids: list
  text: Optional[list]
  finish_reasons: list
  prompt_lengths: list


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
  """The decode loop's carry: per-row sampling parameters and progress."""
  token: jax.Array        # [B] the last token (input of the next step)
  pos: jax.Array          # [B] its position (real tokens before it)
  done: jax.Array         # [B] bool, the row has finished
  out: jax.Array          # [B, N >= max_new_tokens] new tokens, -1 where none
  step: jax.Array         # [] tokens produced so far
  keys: jax.Array         # [B] PRNG keys (one per row)
  temperature: jax.Array  # [B] float32, 0 = greedy
  top_k: jax.Array        # [B] int32, 0 = all tokens
  top_p: jax.Array        # [B] float32, 1 = all tokens
  eos: jax.Array          # [E] int32 eos ids (-1 pads; E a power of two >= 4)


def process_logits(logits, temperature, top_k, top_p):
  """Log-probabilities after temperature, top-k and top-p, per row (masked tokens are -inf).

  Args:
    logits: [B, V].
    temperature: [B] > 0 (rows with 0 are treated as 1; they are decoded greedily anyway).
    top_k: [B] int, 0 keeps every token.
    top_p: [B] in (0, 1].
  Returns:
    [B, V] float32 log-softmax of the kept tokens.
  """
  logits = logits.astype(jnp.float32)
  t = jnp.where(temperature > 0, temperature, 1.0)
  logits = logits / t[:, None]
  v = logits.shape[-1]
  desc = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
  kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)        # ties with the k-th are kept
  # Nucleus, in transformers' order of operations: ascending cumulative probabilities, drop
  # the tokens whose cumulative mass is <= 1 - top_p, always keep the most likely one.
  asc = jnp.sort(logits, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
  keep = (cum > 1 - top_p[:, None]).at[:, -1].set(True)
  cut = jnp.min(jnp.where(keep, asc, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def sample_tokens(logits, temperature, top_k, top_p, keys, counts, sampling: bool):
  """The next token of each row: argmax where `temperature` is 0, else a draw from
  `process_logits` with key `fold_in(keys[i], counts[i])` (counts: tokens the row has made).

  `sampling` (static) False skips the sampling work when every row is greedy.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not sampling:
    return greedy
  logp = process_logits(logits, temperature, top_k, top_p)
  keys = jax.vmap(jax.random.fold_in)(keys, counts)
  sampled = jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _next_token(logits, state: _State, sampling: bool):
  return sample_tokens(logits, state.temperature, state.top_k, state.top_p, state.keys,
                       jnp.broadcast_to(state.step, state.keys.shape), sampling)


def _record(state: _State, token) -> _State:
  """Writes `token` for the unfinished rows at the current step and advances."""
  token = jnp.where(state.done, -1, token)
  out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, state.step))
  done = state.done | jnp.any(token[:, None] == state.eos[None, :], axis=-1)
  return dataclasses.replace(state, token=jnp.maximum(token, 0), out=out, done=done,
                             step=state.step + 1, pos=state.pos + 1)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(6,))
def _prefill(graphdef, sampling, params, ids, mask, ctx, cache, state):
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
  ctx = dataclasses.replace(ctx, attention=cache)
  logits, cache = apply(graphdef, params, "last_logits", ids, mask, positions, ctx=ctx)
  state = dataclasses.replace(state, pos=positions[:, -1])
  state = _record(state, _next_token(logits, state, sampling))
  return cache, state


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4, 5))
def _decode(graphdef, sampling, params, ctx, cache, state, limit):
  def cond(carry):
    _, s = carry
    return (s.step < limit) & ~jnp.all(s.done)

  def body(carry):
    cache, s = carry
    step_ctx = dataclasses.replace(ctx, attention=cache)
    logits, cache = apply(graphdef, params, "last_logits", s.token[:, None], None,
                          s.pos[:, None], ctx=step_ctx)
    return cache, _record(s, _next_token(logits, s, sampling))

  return jax.lax.while_loop(cond, body, (cache, state))


def compile_counts() -> dict:
  """Compiled variants of the prefill and the decode loop so far (for tests and benchmarks)."""
  return {"prefill": _prefill._cache_size(), "decode": _decode._cache_size()}


def _default_eos(model) -> list:
  """eos ids as transformers' generate takes them: generation_config.json, config.json, the
  tokenizer."""
  directory = getattr(model, "directory", None)
  for name in ("generation_config.json", "config.json"):
    path = None if directory is None else os.path.join(directory, name)
    if path and os.path.isfile(path):
      try:
        with open(path) as f:
          value = json.load(f).get("eos_token_id")
      except (OSError, ValueError, AttributeError):
        value = None
      if value is not None:
        return [int(v) for v in np.atleast_1d(value)]
  tok = model.tokenizer
  return [] if tok is None or tok.eos_token_id is None else [int(tok.eos_token_id)]


def _prompts(model, inputs, attention_mask) -> tuple[list, bool]:
  """Token id lists of the prompts, and whether they came as text."""
  if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                 and all(isinstance(x, str) for x in inputs)):
    tok = model.tokenizer
    if tok is None:
      raise ValueError("text prompts need the model dir's tokenizer, and this model has none; "
                       "pass token ids instead")
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    return [list(map(int, ids)) for ids in tok(texts)["input_ids"]], True
  if isinstance(inputs, (list, tuple)) and inputs and all(
      isinstance(x, (int, np.integer)) for x in inputs):
    inputs = [inputs]
  if isinstance(inputs, (list, tuple)) and all(
      isinstance(x, (list, tuple, np.ndarray)) for x in inputs) and inputs:
    if attention_mask is not None:
      raise ValueError("attention_mask= goes with a [batch, seq] array of ids; ragged lists of "
                       "ids need no mask")
    rows = [np.asarray(x) for x in inputs]
  else:
    arr = np.asarray(inputs)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.size == 0:
      raise ValueError(f"inputs must be text, a list of texts, token ids [seq] or [batch, seq], "
                       f"or a list of id lists; got shape {arr.shape}")
    if attention_mask is None:
      rows = list(arr)
    else:
      mask = np.asarray(attention_mask)
      if mask.shape != arr.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input ids shape {arr.shape}")
      rows = [r[m.astype(bool)] for r, m in zip(arr, mask)]
  out = []
  for i, r in enumerate(rows):
    if r.ndim != 1 or not (r.size == 0 or np.issubdtype(r.dtype, np.integer)):
      raise ValueError(f"prompt {i}: expected a list of int token ids, got {r.dtype} of shape "
                       f"{r.shape}")
    out.append([int(x) for x in r])
  return out, False


def _check(name, value, ok, expected):
  if not ok:
    raise ValueError(f"{name} must be {expected}; got {value!r}")


def _per_row(name, value, rows, dtype, ok, expected):
  vals = np.asarray(value)
  if vals.ndim == 0:
    vals = np.broadcast_to(vals, (rows,))
  if vals.shape != (rows,):
    raise ValueError(f"{name} must be one value or one per prompt ({rows}); got {value!r}")
  for v in vals:
    _check(name, v, ok(v), expected)
  return vals.astype(dtype)


def _stop_index(tok, ids, stops) -> Optional[tuple[int, int]]:
  """(tokens to keep, text chars to keep) at the first stop string in the decoded `ids`."""
  text = tok.decode(ids, skip_special_tokens=True)
  hits = [(text.find(s), s) for s in stops if s in text]
  if not hits:
    return None
  first = min(h[0] for h in hits)
  for k in range(1, len(ids) + 1):  # the token that completes the first stop string
    part = tok.decode(ids[:k], skip_special_tokens=True)
    if any(s in part for s in stops):
      return k, first
  return len(ids), first


def generate(model, inputs, *, attention_mask=None, max_new_tokens: int = 32,
             temperature: Union[float, Sequence[float]] = 0.0,
             top_k: Union[int, Sequence[int]] = 0, top_p: Union[float, Sequence[float]] = 1.0,
             seed: Union[int, Sequence[int]] = 0, eos_token_id=None,
             stop: Union[str, Sequence[str], None] = None, adapter=None, adapters=None,
             adapter_ids=None, context=None, stop_check_every: int = 8) -> GenerateOutput:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: a `CausalLM` (Llama, Mistral, Qwen2, a GGUF model, the embedded default).
    inputs: text or a list of texts (through `model.tokenizer`), token ids `[seq]` or
      `[batch, seq]` (with `attention_mask`, left or right padding), or a list of id lists.
    attention_mask: [batch, seq] 1 = token, 0 = padding, for an id array.
    max_new_tokens: tokens to generate at most per row (> 0).
    temperature: 0 = greedy (argmax); > 0 samples. One value or one per prompt.
    top_k: sample among the k most likely tokens (0 = all). One value or one per prompt.
    top_p: nucleus sampling mass in (0, 1] (1 = all). One value or one per prompt.
    seed: the sampling seed: one (row i draws from `fold_in(key(seed), i)`) or one per prompt
      (each row from `key(seed_i)`, wherever it sits in the batch); a fixed seed reproduces
      the output.
    eos_token_id: an id or a list of ids that end a row; None reads the model dir's
      generation_config.json / config.json / tokenizer (as transformers); [] never stops early.
    stop: a string or strings that end a row (checked on the decoded text; needs a tokenizer).
    adapter: one `LoraAdapter` for every row.
    adapters, adapter_ids: a list of adapters and one id per prompt (-1 = base only).
    context: a ready forward `Context` without attention state (e.g. a MeteoRA model's routers,
      `jaxadapt.meteora`), instead of adapter/adapters; its routing must not depend on the
      batch's shape.
    stop_check_every: decode steps between host checks of stop strings.

  Returns:
    A `GenerateOutput`.

  Raises:
    ValueError: a prompt longer than the model's context (or prompt + max_new_tokens), a
      max_new_tokens <= 0, a negative temperature, top_k < 0, top_p outside (0, 1], an empty
      prompt, stop strings without a tokenizer, or an adapter that does not fit this model.
      Nothing is compiled or run before the arguments are checked.
  """
  prompts, from_text = _prompts(model, inputs, attention_mask)
  rows = len(prompts)
  _check("max_new_tokens", max_new_tokens,
         isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
         and max_new_tokens > 0, "an int > 0")
  temps = _per_row("temperature", temperature, rows, np.float32,
                   lambda v: np.isfinite(float(v)) and float(v) >= 0, "a float >= 0 (0 = greedy)")
  top_ks = _per_row("top_k", top_k, rows, np.int32,
                    lambda v: float(v) == int(v) and int(v) >= 0, "an int >= 0 (0 = all tokens)")
  top_ps = _per_row("top_p", top_p, rows, np.float32,
                    lambda v: 0 < float(v) <= 1, "a float in (0, 1]")
  seeds = _per_row("seed", seed, rows, np.int64,
                   lambda v: float(v) == int(v) and 0 <= int(v) < 2 ** 32,
                   "an int in [0, 2**32)")
  _check("stop_check_every", stop_check_every,
         isinstance(stop_check_every, int) and stop_check_every > 0, "an int > 0")
  stops = [stop] if isinstance(stop, str) else list(stop or ())
  _check("stop", stop, all(isinstance(s, str) and s for s in stops),
         "a non-empty string or a list of them")
  tok = model.tokenizer if (from_text or stops) else None
  if stops and tok is None:
    raise ValueError("stop strings are matched on decoded text, and this model has no "
                     "tokenizer; pass eos_token_id= instead")
  if eos_token_id is None:
    eos = _default_eos(model)
  else:
    eos = [int(v) for v in np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64))]
  vocab = model.config.vocab_size
  _check("eos_token_id", eos_token_id, all(0 <= e < vocab for e in eos),
         f"ids in [0, {vocab})")
  window = model.config.max_position_embeddings
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty; generation needs at least one token")
    bad = [t for t in p if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:3]} outside the vocabulary [0, {vocab})")
    if len(p) + max_new_tokens > window:
      raise ValueError(f"prompt {i} has {len(p)} tokens and max_new_tokens={max_new_tokens}: "
                       f"{len(p) + max_new_tokens} > the model's context of {window} tokens "
                       f"(max_position_embeddings); shorten the prompt or ask for fewer tokens")

  b = bucket(rows)
  p_len = bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
  cache_len = bucket(p_len + max_new_tokens)
  ids = np.zeros((b, p_len), np.int32)
  mask = np.zeros((b, p_len), np.int32)
  for i, p in enumerate(prompts):
    ids[i, p_len - len(p):] = p
    mask[i, p_len - len(p):] = 1
  if adapter_ids is not None:
    ids_arr = np.asarray(adapter_ids)
    if ids_arr.shape != (rows,):
      raise ValueError(f"adapter_ids must hold one id per prompt, shape ({rows},); got shape "
                       f"{ids_arr.shape}")
    adapter_ids = np.concatenate([ids_arr, -np.ones(b - rows, ids_arr.dtype)])
  if context is not None and (context.attention is not None or context.routing is not None):
    raise ValueError("generate(context=) takes a context without attention state or routing "
                     "(generate builds the KV cache and pads the batch); pass routers or one "
                     "adapter's weights, or use adapters= with adapter_ids=")
  ctx = model.make_context(adapter=adapter, adapters=adapters, adapter_ids=adapter_ids,
                           context=context, batch=b) or Context()
  pad = lambda v, fill: np.concatenate([v, np.full(b - rows, fill, v.dtype)])
  sampling = bool((temps > 0).any())
  if np.ndim(seed) == 0:  # one seed: row i draws from fold_in(key(seed), i)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(int(seeds[0])), i))(
        jnp.arange(b, dtype=jnp.uint32))
  else:  # a seed per prompt: its row's draws do not depend on where the row sits
    keys = jax.vmap(jax.random.key)(jnp.asarray(pad(seeds, 0), jnp.uint32))
  state = _State(
      token=jnp.zeros((b,), jnp.int32), pos=jnp.zeros((b,), jnp.int32),
      done=jnp.asarray(np.arange(b) >= rows),
      out=jnp.full((b, cache_len), -1, jnp.int32),  # >= max_new_tokens, one shape per cache
      step=jnp.zeros((), jnp.int32), keys=keys, temperature=jnp.asarray(pad(temps, 0)),
      top_k=jnp.asarray(pad(top_ks, 0)), top_p=jnp.asarray(pad(top_ps, 1)),
      eos=jnp.asarray(eos + [-1] * (bucket(len(eos), 4) - len(eos)), jnp.int32))
  cache = model.init_cache(b, cache_len)
  cache, state = _prefill(model.graphdef, sampling, model.params, jnp.asarray(ids),
                          jnp.asarray(mask), ctx, cache, state)
  stopped = {}  # row -> (tokens kept, chars kept)
  step = 1
  while step < max_new_tokens:
    limit = max_new_tokens if not stops else min(step + stop_check_every, max_new_tokens)
    cache, state = _decode(model.graphdef, sampling, model.params, ctx, cache, state,
                           jnp.asarray(limit, jnp.int32))
    step = int(state.step)
    if stops:
      out, done = np.asarray(state.out), np.asarray(state.done)
      for r in range(rows):
        if r in stopped or (done[r] and not (out[r] >= 0).any()):
          continue
        hit = _stop_index(tok, [int(t) for t in out[r] if t >= 0], stops)
        if hit is not None:
          stopped[r] = hit
      if stopped:
        new_done = np.asarray(state.done).copy()
        new_done[list(stopped)] = True
        state = dataclasses.replace(state, done=jnp.asarray(new_done))
    if bool(np.asarray(state.done).all()):
      break
  out = np.asarray(state.out)
  results, reasons, texts = [], [], []
  for r in range(rows):
    row = [int(t) for t in out[r] if t >= 0]
    reason = "length"
    cut_chars = None
    if stops and r not in stopped:
      hit = _stop_index(tok, row, stops)
      if hit is not None:
        stopped[r] = hit
    if r in stopped:
      keep, cut_chars = stopped[r]
      row, reason = row[:keep], "stop"
    elif row and row[-1] in eos:
      reason = "stop"
    results.append(row)
    reasons.append(reason)
    if from_text or stops:
      text = tok.decode(row, skip_special_tokens=True)
      texts.append(text[:cut_chars] if cut_chars is not None else text)
  if not (from_text or stops) and model.tokenizer is not None:
    texts = [model.tokenizer.decode(row, skip_special_tokens=True) for row in results]
  return GenerateOutput(ids=results, text=texts if texts else None, finish_reasons=reasons,
                        prompt_lengths=[len(p) for p in prompts])
