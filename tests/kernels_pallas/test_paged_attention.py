"""Ragged paged attention: the jnp reference against dense causal attention per sequence, the
KV write, and the TPU kernel's lowering (jax.export)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import attention as pa
import kernels_pallas as kp

HQ, HK, D, BLOCK, P = 4, 2, 8, 4, 40


def _case(seed, kv_lens, q_lens, window=None, pad_tokens=3, pad_seqs=2):
  """Random pages for sequences of `kv_lens` tokens whose last `q_lens` are queried; returns the
  op's inputs and the dense expectation."""
  rng = np.random.default_rng(seed)
  s = len(kv_lens)
  per_seq = max(-(-k // BLOCK) for k in kv_lens)
  order = rng.permutation(np.arange(1, P))  # page 0 is scratch
  tables = np.zeros((s + pad_seqs, per_seq), np.int32)
  used = 0
  keys = [rng.normal(size=(k, HK, D)).astype(np.float32) for k in kv_lens]
  values = [rng.normal(size=(k, HK, D)).astype(np.float32) for k in kv_lens]
  pages = rng.normal(size=(P, BLOCK, 2 * HK, D)).astype(np.float32)  # garbage everywhere
  for i, k in enumerate(kv_lens):
    n = -(-k // BLOCK)
    tables[i, :n] = order[used:used + n]
    used += n
    for pos in range(k):
      pg, off = tables[i, pos // BLOCK], pos % BLOCK
      pages[pg, off, 0::2], pages[pg, off, 1::2] = keys[i][pos], values[i][pos]
  t = sum(q_lens) + pad_tokens
  q = rng.normal(size=(t, HQ, D)).astype(np.float32)
  cu = np.concatenate([[0], np.cumsum(q_lens), np.full(pad_seqs, sum(q_lens))]).astype(np.int32)
  want = np.zeros_like(q)
  for i, (k, n) in enumerate(zip(kv_lens, q_lens)):
    for j in range(n):
      pos = k - n + j
      tok = cu[i] + j
      for h in range(HQ):
        kh = h // (HQ // HK)
        ks = np.arange(pos + 1)
        if window is not None:
          ks = ks[pos - ks < window]
        sc = keys[i][ks, kh] @ q[tok, h] * D ** -0.5
        w = np.exp(sc - sc.max())
        want[tok, h] = (w / w.sum()) @ values[i][ks, kh]
  kv = np.concatenate([kv_lens, np.zeros(pad_seqs, int)]).astype(np.int32)
  args = (jnp.asarray(q), jnp.asarray(pages), jnp.asarray(kv), jnp.asarray(tables),
          jnp.asarray(cu), jnp.asarray([s], jnp.int32))
  return args, want, max(q_lens)


@pytest.mark.parametrize("kv_lens,q_lens,window", [
    ((5, 1, 9, 12), (5, 1, 3, 1), None),      # a prefill, a 1-token prompt, a chunk, a decode
    ((5, 9, 12, 3), (5, 3, 1, 1), None),      # prefills first, then decodes
    ((7, 13, 2), (1, 1, 1), None),            # decode only
    ((11, 6, 9), (4, 1, 9), 3),               # a sliding window
])
def test_reference_equals_dense_attention(kv_lens, q_lens, window):
  args, want, max_q = _case(0, kv_lens, q_lens, window)
  got = pa.reference(*args, sm_scale=D ** -0.5, max_q=max_q, sliding_window=window)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # A larger static rectangle changes nothing.
  got = jax.jit(lambda *a: pa.ragged_paged_attention(
      *a, sm_scale=D ** -0.5, max_q=16, sliding_window=window))(*args)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # The step's own keys in flight (not yet in the pages) give the same.
  q, pages, kv, tables, cu, num = args
  k_new = np.zeros((q.shape[0], HK, D), np.float32)
  v_new = np.zeros_like(k_new)
  wiped = np.asarray(pages).copy()
  for i, (k, n) in enumerate(zip(kv_lens, q_lens)):
    for j in range(n):
      pos = k - n + j
      pg, off = tables[i, pos // BLOCK], pos % BLOCK
      k_new[cu[i] + j], v_new[cu[i] + j] = wiped[pg, off, 0::2], wiped[pg, off, 1::2]
      wiped[pg, off] = 1e3  # the pages must not be read there
  new_kv = (jnp.asarray(k_new), jnp.asarray(v_new))
  for bound in (16, max_q):  # max_q = 1 (decode only) takes the decode path
    got = pa.reference(q, jnp.asarray(wiped), kv, tables, cu, num, sm_scale=D ** -0.5,
                       max_q=bound, sliding_window=window, new_kv=new_kv)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # Long query runs first, single queries after: the split rectangles give the same.
  long = sum(1 for n in q_lens if n > 1)
  if all(n == 1 for n in q_lens[long:]):
    for pages_now, kv_now in ((pages, None), (jnp.asarray(wiped), new_kv)):
      got = pa.reference(q, pages_now, kv, tables, cu, num, sm_scale=D ** -0.5, max_q=16,
                         sliding_window=window, long_seqs=long, new_kv=kv_now)
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_write_kv_places_tokens_and_interleaves_heads():
  rng = np.random.default_rng(1)
  pages = jnp.zeros((6, BLOCK, 2 * HK, D))
  k, v = rng.normal(size=(2, 3, HK, D)).astype(np.float32)
  tables = jnp.asarray([[3, 5], [1, 2]], jnp.int32)
  seq, pos = jnp.asarray([0, 0, 1]), jnp.asarray([3, 4, 1])
  page, off = pa.token_slots(tables, seq, pos, BLOCK, jnp.asarray([True, True, False]))
  np.testing.assert_array_equal(np.asarray(page), [3, 5, 0])
  np.testing.assert_array_equal(np.asarray(off), [3, 0, 0])
  out = np.asarray(pa.write_kv(pages, jnp.asarray(k), jnp.asarray(v), page, off))
  np.testing.assert_array_equal(out[3, 3, 0::2], k[0])
  np.testing.assert_array_equal(out[3, 3, 1::2], v[0])
  np.testing.assert_array_equal(out[5, 0, 1::2], v[1])
  assert not out[1].any() and not out[2].any()


def test_tpu_kernel_lowers(monkeypatch):
  """jax's kernel asks the device kind and core count while lowering; here (no TPU) we name
  a one-core v5e for it."""
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
  monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  t, s, pages_per_seq = 32, 4, 4
  q = jnp.zeros((t, 8, 128), jnp.bfloat16)
  kv = jnp.zeros((64, 16, 4, 128), jnp.bfloat16)
  ints = (jnp.zeros((s,), jnp.int32), jnp.zeros((s, pages_per_seq), jnp.int32),
          jnp.zeros((s + 1,), jnp.int32), jnp.ones((1,), jnp.int32))
  before = kp.get_backend()
  kp.set_backend("pallas_tpu")
  try:
    fn = lambda q, kv, *i: pa.ragged_paged_attention(q, kv, *i, sm_scale=0.1, max_q=t,
                                                       tpu_blocks=(4, 16))
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, kv, *ints)
  finally:
    kp.set_backend(before)
  assert "tpu_custom_call" in exported.mlir_module()
