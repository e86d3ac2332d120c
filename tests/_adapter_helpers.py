"""Adapters for tests that must change the output (init_lora starts at B = 0)."""
import jax

from jaxadapt.adapters.lora import LoraAdapter


def perturbed(adapter, seed):
  """Random non-zero B and magnitudes, so every adapter matters."""
  key = jax.random.key(seed)
  weights = {}
  for path, w in adapter.weights.items():
    key, k1, k2 = jax.random.split(key, 3)
    w = dict(w, b=0.3 * jax.random.normal(k1, w["b"].shape))
    if "magnitude" in w:
      w["magnitude"] = w["magnitude"] * (1 + 0.2 * jax.random.uniform(k2, w["magnitude"].shape))
    weights[path] = w
  return LoraAdapter(weights=weights, config=adapter.config)
