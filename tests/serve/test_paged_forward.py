"""The Llama family over the unified pool: a packed forward whose KV pages and adapter pages
share one array equals the dense forward (prefill, chunked prefill, decode, mixed adapters)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxadapt as ja
from _adapter_helpers import perturbed
from jaxadapt.context import Context, PagedKV, make_routing
from jaxadapt.models.frozen import apply
from kernels_pallas import attention as pa
from serve.pool import OutOfPages, PagedPool


@pytest.fixture(scope="module")
def setup(llama_dir):
  model = ja.load_model(llama_dir[0])
  configs = [ja.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
             ja.LoraConfig(r=5, target_modules="all-linear"),
             ja.LoraConfig(r=3, target_modules=["down_proj", "o_proj", "k_proj"])]
  adapters = [perturbed(ja.init_lora(model, c, seed=i), 20 + i) for i, c in enumerate(configs)]
  return model, adapters


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(graphdef, params, pages, ctx, ids, positions, select):
  """The packed forward, then the new keys/values written (as the engine does)."""
  ctx = ctx.with_pages(pages)
  logits, pages, new_kv = apply(graphdef, params, "packed_logits", ids, positions, select,
                                ctx=ctx)
  if new_kv is not None:
    kv = ctx.attention
    shape = (pages.shape[0], kv.block, new_kv[0].shape[2] * 2, new_kv[0].shape[3])
    pages = pa.write_layers(pages.reshape(shape), *new_kv, kv.tables, kv.token_seq,
                            positions[0], kv.token_valid).reshape(pages.shape)
  return logits, pages


class _Seqs:
  """Host bookkeeping for a few sequences in the pool (what the engine's scheduler does)."""

  def __init__(self, pool, n):
    self.pool, self.lens, self.pages = pool, [0] * n, [[] for _ in range(n)]

  def step(self, model, chunks, slots, pps=4):
    """One packed forward of `chunks` (token lists per sequence); logits at each chunk's end."""
    pool, s = self.pool, len(chunks)
    tokens, positions, seq, select = [], [], [], []
    for i, chunk in enumerate(chunks):
      start = self.lens[i]
      need = -(-(start + len(chunk)) // pool.block) - len(self.pages[i]) // pool.layers
      self.pages[i] += pool.alloc(need * pool.layers)
      tokens += chunk
      positions += list(range(start, start + len(chunk)))
      seq += [i] * len(chunk)
      select.append(len(tokens) - 1)
      self.lens[i] += len(chunk)
    t = len(tokens) + 3  # padding tokens
    tables = np.zeros((pool.layers, s, pps), np.int32)
    for i in range(s):
      blocks = np.asarray(self.pages[i]).reshape(-1, pool.layers)  # [blocks, layers]
      tables[:, i, :blocks.shape[0]] = blocks.T
    cu = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int32)
    kv = PagedKV(tables=jnp.asarray(tables), kv_lens=jnp.asarray(self.lens, jnp.int32),
                 cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([s], jnp.int32),
                 token_seq=jnp.asarray(seq + [0] * 3, jnp.int32),
                 token_valid=jnp.asarray([True] * len(seq) + [False] * 3),
                 block=pool.block, max_q=max(len(c) for c in chunks))
    slot_ids = np.asarray([slots[i] for i in seq] + [-1] * 3, np.int32)
    ctx = Context(weights=pool.views(), pool=pool.adapter_pool(),
                  routing=make_routing("token", slot_ids, pool.max_adapters), attention=kv)
    ids = jnp.asarray([tokens + [0] * 3], jnp.int32)
    pos = jnp.asarray([positions + [0] * 3], jnp.int32)
    logits, pool.pages = _step(model.graphdef, model.params, pool.pages, ctx, ids, pos,
                               jnp.asarray(select, jnp.int32))
    return np.asarray(logits)


def test_packed_forward_over_the_pool_equals_the_dense_forward(setup):
  model, adapters = setup
  block = PagedPool.block_for(model, 4)
  pool = PagedPool(model, num_pages=200, block=block, max_adapters=4, max_rank=8)
  res = [pool.load(("a%d" % i, "d"), a) for i, a in enumerate(adapters)]
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, 97, n)) for n in (5, 9, 3, 7)]
  which = [0, -1, 2, 1]
  slots = [res[w].slot if w >= 0 else -1 for w in which]
  seqs = _Seqs(pool, 4)

  def dense(i, tokens):
    a = None if which[i] < 0 else adapters[which[i]]
    return np.asarray(model(np.asarray([tokens]), adapter=a))[0, -1]

  # Prefill: sequence 1 in two chunks (6 then 3 tokens), the others whole.
  got = seqs.step(model, [prompts[0], prompts[1][:6], prompts[2], prompts[3]], slots)
  np.testing.assert_allclose(got[1], dense(1, prompts[1][:6]), atol=1e-4)
  for i in (0, 2, 3):
    np.testing.assert_allclose(got[i], dense(i, prompts[i]), atol=1e-4)
  got = seqs.step(model, [[5], prompts[1][6:], [7], [8]], slots)
  full = [prompts[0] + [5], prompts[1], prompts[2] + [7], prompts[3] + [8]]
  for i in range(4):
    np.testing.assert_allclose(got[i], dense(i, full[i]), atol=1e-4)
  for step in range(3):  # decode steps cross page boundaries
    nxt = [int(np.argmax(g)) for g in got]
    full = [f + [n] for f, n in zip(full, nxt)]
    got = seqs.step(model, [[n] for n in nxt], slots)
    for i in range(4):
      np.testing.assert_allclose(got[i], dense(i, full[i]), atol=1e-4)
  # The adapters did act (the comparison above is not vacuous).
  assert np.abs(dense(0, full[0]) - np.asarray(model(np.asarray([full[0]])))[0, -1]).max() > 1e-2
  stats = pool.stats(kv_tokens=sum(seqs.lens))
  assert stats["adapter_pages"] == sum(pool.adapter_pages_needed(a) for a in adapters)
  assert 0 < stats["occupancy"] < 1 and 0 <= stats["fragmentation"] < 1


def test_pool_refuses_what_it_cannot_hold(setup):
  model, adapters = setup
  block = PagedPool.block_for(model, 4)
  with pytest.raises(ValueError, match="block="):
    PagedPool(model, num_pages=10, block=block + 1)
  pool = PagedPool(model, num_pages=6, block=block, max_adapters=2, max_rank=4)
  with pytest.raises(ValueError, match="max_rank"):
    pool.load(("big", "d"), adapters[1])
  dora = ja.init_lora(model, ja.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
  with pytest.raises(ValueError, match="DoRA"):
    pool.load(("dora", "d"), dora)
  free = pool.free_pages
  with pytest.raises(OutOfPages):
    pool.load(("a2", "d"), adapters[2])
  assert pool.free_pages == free and not pool.resident
