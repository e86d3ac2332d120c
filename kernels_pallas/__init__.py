"""Pallas kernels for multi-adapter LoRA (S-LoRA's SGMV/BGMV, MeteoRA's top-k form).

Depends on jax only, never on jaxadapt. `reference` defines every op in plain jnp (the
specification); `ops` dispatches to the fastest implementation per backend: the Pallas kernels of
`sgmv_tpu` (Mosaic) and `sgmv_triton` (GPU), or the XLA loop of `xla` on CPU.
"""
from kernels_pallas.ops import (batched_grouping, batched_needs_grouping, get_backend,
                                lora_batched, lora_expand, lora_members, lora_rows, lora_shrink,
                                lora_topk, make_grouping, resolve_backend, set_backend,
                                sgmv_expand, sgmv_shrink, topk_impl)
from kernels_pallas.plan import Grouping
from kernels_pallas.reference import PagedWeights

__all__ = ["Grouping", "PagedWeights", "batched_grouping", "batched_needs_grouping", "get_backend",
           "lora_batched", "lora_expand", "lora_members", "lora_rows", "lora_shrink", "lora_topk",
           "make_grouping", "resolve_backend", "set_backend", "sgmv_expand", "sgmv_shrink", "topk_impl"]
