"""Pallas kernels for multi-adapter LoRA (S-LoRA's SGMV/BGMV, MeteoRA's top-k form).

Depends on jax only, never on jaxadapt. `reference` defines every op in plain jnp (the
specification and the CPU path); `ops` dispatches to the fastest implementation per backend.
"""
from kernels_pallas.ops import get_backend, lora_expand, lora_shrink, lora_topk, set_backend

__all__ = ["get_backend", "lora_expand", "lora_shrink", "lora_topk", "set_backend"]
