"""jaxadapt's S-LoRA serving engine (Sheng et al., MLSys 2024): the adapter store (`store`), the
unified paged pool, the scheduler and the engine; the HTTP server builds on it."""
from serve.store import AdapterError, AdapterStore, StoredAdapter

__all__ = ["AdapterError", "AdapterStore", "StoredAdapter"]
