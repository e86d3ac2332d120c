"""MeteoRA's forward (Xu et al., ICLR 2025, Eq. 3-4) against one LoRA and a per-expert loop.

  python bench/meteora.py            # ~2 min on 2 CPU cores
  python bench/meteora.py --quick    # one small case (seconds)

For each model and adapter count it times one jitted forward of a [batch, seq] prefill with:
  * one LoRA (the cost MeteoRA is compared with: the issue's target is top-k <= 1.5x it);
  * MeteoRA top-1 and top-2 on each form of `kernels_pallas.lora_topk`: "dense" (every adapter
    in two matmuls, gated) and "gather" (the kernels' per-token top-k path), and "auto" (what
    the hook dispatches: `kernels_pallas.topk_impl`);
  * a per-expert loop: the mixture written as a Python loop over the N adapters (each adapter's
    delta times its gate weight, zero outside the top-k), what one writes without the op.
Times are medians of interleaved repeats in one process; the ratios are what to compare (the
machine is shared and noisy). Prints one line per case and a RESULT line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxadapt as ja  # noqa: E402
import kernels_pallas  # noqa: E402
from jaxadapt import meteora  # noqa: E402
from jaxadapt.adapters import hook as hook_lib  # noqa: E402
from jaxadapt.adapters.lora import kernel_at  # noqa: E402
from jaxadapt.causal_lm import CausalLM  # noqa: E402
from jaxadapt.models.llama import LlamaConfig  # noqa: E402
from train.timing import median_ms  # noqa: E402


def _per_expert_gated(x, base, view, ids, gates, groupings=None):
  """The mixture as a loop over experts: sum_n (gate weight of n) * s_n (x A_n) B_n."""
  del groupings
  x2 = x.reshape(-1, x.shape[-1])
  out = base.reshape(-1, base.shape[-1]).astype(jnp.float32)
  for n in range(view.num_adapters):
    w = jnp.sum(jnp.where(ids == n, gates, 0), axis=-1, keepdims=True)
    delta = (x2 @ view.a[n]) @ view.b[n] * view.scale[n]
    out = out + w * delta
  return out.astype(base.dtype).reshape(base.shape)


def _forced(form: str, m, ids, k):
  """A jitted MeteoRA forward with the top-k op's form forced at trace time."""
  ctx = m.context(top_k=k)

  def run(ids, ctx):
    real_impl, real_gated = kernels_pallas.ops.topk_impl, hook_lib._gated  # pylint: disable=protected-access
    try:
      if form == "loop":
        hook_lib._gated = _per_expert_gated  # pylint: disable=protected-access
      elif form != "auto":
        kernels_pallas.ops.topk_impl = lambda *a, **kw: form
      from jaxadapt.causal_lm import forward
      return forward(m.model.graphdef, m.model.params, ids, None, None, ctx)
    finally:
      kernels_pallas.ops.topk_impl, hook_lib._gated = real_impl, real_gated  # pylint: disable=protected-access
  fn = jax.jit(run)
  return lambda: fn(ids, ctx)


def case(name: str, model: CausalLM, adapters, batch: int, seq: int, repeats: int) -> dict:
  m = meteora.build_meteora(model, adapters, top_k=2, seed=0)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                      (batch, seq)), jnp.int32)
  one = jax.jit(lambda ids: model(ids, adapter=adapters[0]))
  fns = {"one_lora": lambda: one(ids)}
  for k in (1, 2):
    for form in ("dense", "gather", "auto", "loop"):
      fns[f"top{k}_{form}"] = _forced(form, m, ids, k)
  t = median_ms(fns, repeats)
  n = len(adapters)
  shapes = [jnp.shape(kernel_at(model.params, p)) for p in m.paths]
  auto = {k: f"dense on {sum(kernels_pallas.topk_impl(n, k, 16, d, o) == 'dense' for d, o in shapes)}"
             f"/{len(shapes)}" for k in (1, 2)}
  parts = [f"{name}: N={n} tokens={batch}x{seq} one LoRA {t['one_lora']:.1f} ms"]
  for k in (1, 2):
    parts.append(
        f"top-{k}: dense {t[f'top{k}_dense'] / t['one_lora']:.2f}x, gather "
        f"{t[f'top{k}_gather'] / t['one_lora']:.2f}x, auto ({auto[k]}) "
        f"{t[f'top{k}_auto'] / t['one_lora']:.2f}x of one LoRA; per-expert loop "
        f"{t[f'top{k}_loop'] / t[f'top{k}_auto']:.2f}x auto")
  print(" | ".join(parts), flush=True)
  return t


def _random_adapters(model, n: int, r: int):
  out = []
  for i in range(n):
    a = ja.init_lora(model, ja.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"),
                     seed=i)
    key = jax.random.key(100 + i)
    weights = {p: dict(w, b=0.02 * jax.random.normal(jax.random.fold_in(key, j), w["b"].shape))
               for j, (p, w) in enumerate(a.weights.items())}
    out.append(ja.LoraAdapter(weights=weights, config=a.config))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="one small case")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  results = {}
  model = ja.load_model("default")
  default_adapters = [ja.load_adapter(f"default:{t}") for t in ja.default.TASKS]
  if args.quick:
    results["default"] = case("default model", model, default_adapters[:4], 4, 32, 3)
  else:
    results["default"] = case("default model", model, default_adapters, 16, 128, args.repeats)
    wide = CausalLM.random(LlamaConfig(model_type="llama", vocab_size=512, hidden_size=512,
                                       intermediate_size=1536, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4,
                                       head_dim=64, max_position_embeddings=256), seed=0)
    for n in (8, 32):
      results[f"wide_{n}"] = case("hidden 512", wide, _random_adapters(wide, n, 16), 8, 128,
                                  args.repeats)
  t = results["default"]
  print(f"RESULT default_top1_vs_one_lora={t['top1_auto'] / t['one_lora']:.2f} "
        f"default_top2_vs_one_lora={t['top2_auto'] / t['one_lora']:.2f} "
        f"default_loop_vs_top2={t['top2_loop'] / t['top2_auto']:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
