"""Flax NNX model families written for a frozen base plus adapters."""
from jaxadapt.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
