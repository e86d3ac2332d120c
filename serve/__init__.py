"""jaxadapt's S-LoRA serving engine (Sheng et al., MLSys 2024): the adapter store (`store`), the
unified paged pool (`pool`) and the engine (`engine`); the HTTP server builds on it.

```python
import jaxadapt as ja, serve
engine = serve.Engine(ja.load_model("default"), adapters={"reverse": "default:reverse"})
```
"""
from serve.engine import Completion, Engine, Handle, Overloaded, Request, TokenEvent
from serve.pool import OutOfPages, PagedPool
from serve.store import (AdapterBusy, AdapterError, AdapterExists, AdapterStore, StoredAdapter,
                         UnknownAdapter)

__all__ = ["AdapterBusy", "AdapterError", "AdapterExists", "AdapterStore", "Completion", "Engine",
           "Handle", "OutOfPages", "Overloaded", "PagedPool", "Request", "StoredAdapter",
           "TokenEvent", "UnknownAdapter"]
