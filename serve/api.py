"""`jaxadapt serve`: an OpenAI-compatible HTTP server over the S-LoRA engine.

  jaxadapt serve                                   # the embedded default + its 8 task adapters
  jaxadapt serve --model DIR --adapter sql=ADAPTER_DIR --adapter-dir adapters/ --pool-mb 512
  jaxadapt serve --model FILE.gguf --api-key KEY --host 0.0.0.0 --port 8000

Clients talk to it as to vLLM (the `openai` package, unchanged, with `base_url=.../v1`); `model`
is the base's name or an adapter's. Routes:

  POST /v1/completions, /v1/chat/completions     generation (SSE streaming with `stream`)
  GET  /v1/models, /v1/models/{name}              the base and every adapter: parent, rank,
                                                  targets, residency (disk, host or device)
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   adapters at run time (as vLLM)
  GET  /health, /metrics                           liveness; Prometheus metrics, including the
                                                  Gateway API Inference Extension's protocol

The engine steps on its own thread; each request's `Handle` is read by a small daemon thread that
hands its events to the event loop (`loop.call_soon_threadsafe`), so no engine call ever blocks
the loop. Every request is checked before anything is queued, and every failure is answered as
OpenAI answers it: `{"error": {"message", "type", "param", "code"}}` with its status code.
See docs/serving.md ("The HTTP server").
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HTTPRequest

log = logging.getLogger("jaxadapt.serve")

MAX_CHOICES = 128       # prompts x n of one request at most
MAX_STOPS = 16          # stop strings of one request at most
MAX_BODY_BYTES = 8 << 20
GREEDY_BELOW = 1e-5     # a temperature below this samples greedily (as vLLM)
TOP_LOGPROBS = 5        # the engine's alternatives per token (serve.engine.TOP_LOGPROBS)

# -- errors -------------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
  """An error answered as OpenAI does: a status code and `{"error": {...}}`.

  Args:
    status: the HTTP status code.
    message: what was expected, what was found, and what to do.
    param: the request field at fault, if one is.
    code: a short machine-readable code (e.g. "model_not_found").
    headers: extra response headers (e.g. Retry-After).
  """

  def __init__(self, status: int, message: str, *, param: Optional[str] = None,
               code: Optional[str] = None, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                      "param": self.param, "code": self.code}}


def _error_response(err: APIError):
  from fastapi.responses import JSONResponse
  return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(errors: list) -> tuple[str, Optional[str]]:
  """One readable line for pydantic's errors (inputs shown with repr: NaN is not JSON)."""
  parts, param = [], None
  for e in errors[:3]:
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # A union's branch names (e.g. "list[int]") are not fields: keep the field path only.
    loc = [x for x in loc if not any(c in x for c in "[]()")]
    where = ".".join(loc) or "body"
    param = param or (loc[0] if loc else None)
    got = repr(e.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    parts.append(f"{where}: {e.get('msg', 'invalid')} (got {got})")
  more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
  return "; ".join(parts) + more, param


# -- request schemas ----------------------------------------------------------------------------

_STRICT = ConfigDict(extra="ignore", strict=True)  # unknown fields are ignored, as vLLM does
_Temperature = Field(None, ge=0, le=100, allow_inf_nan=False,
                     description="0 = greedy; default: the model's generation_config, else 1")


class StreamOptions(BaseModel):
  model_config = _STRICT
  include_usage: Optional[bool] = None


class _Sampling(BaseModel):
  """The fields completions and chat share."""
  model_config = _STRICT
  model: Optional[str] = Field(None, description="the base's name or an adapter's")
  temperature: Optional[float] = _Temperature
  top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
  top_k: Optional[int] = Field(None, ge=-1, description="0 or -1 = off (a vLLM extension)")
  n: int = Field(1, ge=1, le=MAX_CHOICES)
  seed: Optional[int] = Field(None, ge=-(2 ** 63), lt=2 ** 64,
                              description="choice j of n draws with seed + j (mod 2**32)")
  stop: Optional[Union[str, List[str]]] = None
  stream: Optional[bool] = False
  stream_options: Optional[StreamOptions] = None
  # Accepted at their no-op values only (a request that relies on them gets a 400, not silence).
  presence_penalty: Optional[float] = Field(None, allow_inf_nan=False)
  frequency_penalty: Optional[float] = Field(None, allow_inf_nan=False)
  logit_bias: Optional[Dict[str, float]] = None
  user: Optional[str] = None
  ignore_eos: Optional[bool] = Field(None, description="a vLLM extension: never stop at eos")


class CompletionRequest(_Sampling):
  """POST /v1/completions (OpenAI's legacy completions)."""
  prompt: Union[str, List[str], List[int], List[List[int]]] = Field(
      ..., description="text, texts, token ids, or lists of token ids")
  max_tokens: Optional[int] = Field(16, ge=1)
  logprobs: Optional[int] = Field(None, ge=0, le=TOP_LOGPROBS)
  echo: Optional[bool] = False
  best_of: Optional[int] = Field(None, ge=1)
  suffix: Optional[str] = None
  return_tokens_as_token_ids: Optional[bool] = Field(
      None, description="a vLLM extension: logprob tokens as 'token_id:<id>'")


class TextPart(BaseModel):
  model_config = _STRICT
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = _STRICT
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: Optional[Union[str, List[TextPart]]] = None
  name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
  """POST /v1/chat/completions."""
  messages: List[ChatMessage] = Field(..., min_length=1)
  max_tokens: Optional[int] = Field(None, ge=1, description="default: the rest of the context")
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  logprobs: Optional[bool] = False
  top_logprobs: Optional[int] = Field(None, ge=0, le=TOP_LOGPROBS)
  add_generation_prompt: Optional[bool] = True
  tools: Optional[List[Dict[str, Any]]] = None
  tool_choice: Optional[Union[str, Dict[str, Any]]] = None
  response_format: Optional[Dict[str, Any]] = None


class LoadLoraAdapterRequest(BaseModel):
  """POST /v1/load_lora_adapter (as vLLM)."""
  model_config = _STRICT
  lora_name: str = Field(..., min_length=1, max_length=256)
  lora_path: str = Field(..., min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
  """POST /v1/unload_lora_adapter (as vLLM)."""
  model_config = _STRICT
  lora_name: str = Field(..., min_length=1, max_length=256)
  lora_int_id: Optional[int] = None


class ErrorDetail(BaseModel):
  message: str
  type: str
  param: Optional[str] = None
  code: Optional[str] = None


class ErrorResponse(BaseModel):
  error: ErrorDetail


_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 503)}

# -- adapter paths: confined to the operator's directories --------------------------------------

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(path: str, roots) -> str:
  """The real path of the PEFT dir `path` if it lies inside one of `roots` (realpaths), with its
  adapter files real files inside it too; a relative `path` is taken below the first root.

  Raises:
    APIError: 403 for a path outside every root (`..`, a symlink out, an absolute path
      elsewhere), or when no root is allowed; 404 for a dir that is not a PEFT adapter dir.
  """
  roots = [os.path.realpath(r) for r in roots]
  if not roots:
    raise APIError(403, "loading adapters at run time is off: start the server with "
                        "--adapter-dir DIR or --allowed-adapter-dir DIR to allow a directory",
                   param="lora_path", code="adapter_path_not_allowed")
  if "\0" in path or ".." in path.replace("\\", "/").split("/"):
    raise APIError(403, f"lora_path {path!r} may not contain '..' or NUL; give a path inside "
                        f"the allowed adapter dirs", param="lora_path",
                   code="adapter_path_not_allowed")
  full = path if os.path.isabs(path) else os.path.join(roots[0], path)
  real = os.path.realpath(full)
  if not any(_inside(real, r) for r in roots):
    raise APIError(403, f"lora_path {path!r} resolves to {real}, outside the allowed adapter "
                        f"dirs ({', '.join(roots)})", param="lora_path",
                   code="adapter_path_not_allowed")
  missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(real, f))]
  if missing:
    raise APIError(404, f"lora_path {path!r} is not a PEFT adapter dir: missing "
                        f"{', '.join(missing)}", param="lora_path", code="adapter_not_found")
  for f in ADAPTER_FILES:  # a file symlinked out of the allowed dirs
    target = os.path.realpath(os.path.join(real, f))
    if not any(_inside(target, r) for r in roots):
      raise APIError(403, f"lora_path {path!r}: {f} links to {target}, outside the allowed "
                          f"adapter dirs", param="lora_path", code="adapter_path_not_allowed")
  return real


def scan_adapter_dir(root: str) -> dict:
  """{name: real path} of every PEFT dir below `root` (names: '/'-joined relative paths), never
  leaving it: symlinks that resolve outside `root` are skipped with a warning.

  Raises:
    ValueError: `root` is not a directory, or holds no PEFT dir.
  """
  real_root = os.path.realpath(root)
  if not os.path.isdir(real_root):
    raise ValueError(f"--adapter-dir {root}: expected a directory of PEFT adapter dirs")
  found, seen = {}, set()
  for dirpath, dirnames, filenames in os.walk(real_root, followlinks=True):
    real = os.path.realpath(dirpath)
    if not _inside(real, real_root) or real in seen:  # a link out, or a loop
      if not _inside(real, real_root):
        log.warning("--adapter-dir: skipping %s (links to %s, outside %s)", dirpath, real,
                    real_root)
      dirnames.clear()
      continue
    seen.add(real)
    dirnames.sort()
    if all(f in filenames for f in ADAPTER_FILES):
      files = [os.path.realpath(os.path.join(dirpath, f)) for f in ADAPTER_FILES]
      if all(_inside(f, real_root) for f in files):
        rel = os.path.relpath(dirpath, real_root)
        name = os.path.basename(real_root) if rel == "." else rel.replace(os.sep, "/")
        found[name] = real
      else:
        log.warning("--adapter-dir: skipping %s (its files link outside %s)", dirpath, real_root)
      dirnames.clear()
  if not found:
    raise ValueError(f"--adapter-dir {root}: no PEFT adapter dir below it "
                     f"({' + '.join(ADAPTER_FILES)})")
  return found


def _peft_summary(path: str) -> dict:
  """Rank and targets from adapter_config.json (no weights read): what /v1/models shows for an
  adapter still on disk."""
  try:
    with open(os.path.join(path, "adapter_config.json")) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return {}
  out = {}
  ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
  ranks = [r for r in ranks if isinstance(r, int)]
  if ranks:
    out["rank"] = max(ranks)
  targets = cfg.get("target_modules")
  if isinstance(targets, list):
    out["targets"] = sorted(str(t) for t in targets)
  elif isinstance(targets, str):
    out["targets"] = [targets]
  return out


# -- the bridge: engine handles -> the event loop -----------------------------------------------


def _pump(loop, queue: asyncio.Queue, index: int, handle) -> None:
  """Starts a daemon thread that reads `handle`'s events (blocking) and hands each, then the
  `Completion`, to `queue` on `loop` as (index, item)."""
  def put(item):
    with contextlib.suppress(RuntimeError):  # the loop is closed (server gone): no listener
      loop.call_soon_threadsafe(queue.put_nowait, (index, item))

  def run():
    try:
      for event in handle:
        put(event)
      put(handle.result())
    except BaseException as e:  # never lose the request's end: report it
      put(e)

  threading.Thread(target=run, daemon=True, name=f"jaxadapt-pump-{handle.request_id}").start()


# -- metrics ------------------------------------------------------------------------------------


class _EngineCollector:
  """Prometheus metrics read from the engine at scrape time: the Gateway API Inference
  Extension's model-server protocol under vLLM's names, and the engine's own counters."""

  def __init__(self, engine):
    self.engine = engine

  def describe(self):
    return []

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    e = self.engine
    st = e.stats()
    lora = e.lora_state()
    pool, store = st.get("pool", {}), st.get("store", {})

    def gauge(name, doc, value, **labels):
      g = GaugeMetricFamily(name, doc, labels=list(labels))
      g.add_metric(list(labels.values()), float(value))
      return g

    def counter(name, doc, value):
      return CounterMetricFamily(name, doc, value=float(value))

    # The protocol (docs/proposals/003-model-server-protocol): queue, running, KV utilisation.
    yield gauge("vllm:num_requests_running", "Requests in the running batch.", st["running"])
    yield gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", st["waiting"])
    usage = pool.get("occupancy", 0.0)
    if pool.get("pages"):  # idle prefix blocks and idle adapters are evictable: free for routing
      usage = max(usage - pool.get("evictable_pages", 0) / pool["pages"], 0.0)
    yield gauge("vllm:kv_cache_usage_perc", "Used share of the unified pool: KV and adapter "
                "pages in use, evictable ones not counted (1 = full).", usage)
    yield gauge("vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (the name older "
                "gateways read).", usage)
    # The LoRA affinity labels; the value is the time of this reading (the gateway takes the
    # newest series).
    yield gauge("vllm:lora_requests_info", "Adapters of the running and waiting requests.",
                time.time(), max_lora=str(lora["max_lora"]),
                running_lora_adapters=",".join(lora["running"]),
                waiting_lora_adapters=",".join(lora["waiting"]))
    layers = max(getattr(e.pool, "layers", 1), 1)
    yield gauge("vllm:cache_config_info", "KV block size (tokens) and blocks in the pool.", 1,
                block_size=str(pool.get("block", e.pool.block)),
                num_gpu_blocks=str(pool.get("pages", 0) // layers))
    yield counter("vllm:num_preemptions", "Requests preempted (recomputed later).",
                  st.get("preemptions", 0))
    # The engine's counters.
    for key, doc in (("steps", "Engine steps run."),
                     ("tokens_generated", "Tokens generated by the engine."),
                     ("admissions", "Requests admitted into the batch."),
                     ("admissions_waited", "Admissions that waited for a disk read of their "
                                           "adapter (prefetch did not get to it)."),
                     ("adapter_hits", "Admissions whose adapter was in the pool already."),
                     ("adapter_loads", "Adapters copied into the pool."),
                     ("adapter_evictions", "Adapters evicted from the pool."),
                     ("prefix_hit_tokens", "Prompt tokens served from the prefix cache.")):
      yield counter(f"jaxadapt_engine_{key}", doc, st.get(key, 0))
    hits, loads = st.get("adapter_hits", 0), st.get("adapter_loads", 0)
    yield gauge("jaxadapt_adapter_cache_hit_rate", "Share of admissions whose adapter was in "
                "the pool already.", hits / (hits + loads) if hits + loads else 0.0)
    yield gauge("jaxadapt_pool_occupancy", "Used pages / usable pages of the unified pool "
                "(evictable ones too).", pool.get("occupancy", 0.0))
    yield gauge("jaxadapt_pool_peak_occupancy", "Peak pool occupancy so far.",
                pool.get("peak_occupancy", 0.0))
    yield gauge("jaxadapt_pool_fragmentation", "Share of used page elements holding nothing.",
                pool.get("fragmentation", 0.0))
    pages = GaugeMetricFamily("jaxadapt_pool_pages", "Pool pages by kind.", labels=["kind"])
    for kind, key in (("kv", "kv_pages"), ("adapter", "adapter_pages"), ("free", "free")):
      pages.add_metric([kind], float(pool.get(key, 0)))
    yield pages
    yield gauge("jaxadapt_pool_resident_adapters", "Adapters with pages in the pool.",
                pool.get("resident_adapters", 0))
    yield gauge("jaxadapt_adapters_registered", "Adapters registered.",
                store.get("registered", 0))
    yield gauge("jaxadapt_host_cache_adapters", "Adapters in host memory.",
                store.get("cached", 0))
    yield gauge("jaxadapt_host_cache_bytes", "Bytes of adapter weights in host memory.",
                store.get("cached_bytes", 0))
    for key in ("hits", "loads", "evictions"):
      yield counter(f"jaxadapt_host_cache_{key}", f"Host adapter cache {key}.", store.get(key, 0))


class _Metrics:
  """The server's own metrics (per request), in one registry with the engine collector."""

  def __init__(self, engine):
    from prometheus_client import CollectorRegistry, Counter, Histogram
    self.registry = CollectorRegistry(auto_describe=False)
    self.registry.register(_EngineCollector(engine))
    r = self.registry
    self.http = Counter("jaxadapt_http_requests", "HTTP requests by route and status.",
                        ["route", "status"], registry=r)
    self.success = Counter("vllm:request_success", "Finished requests by reason.",
                           ["finished_reason"], registry=r)
    self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.",
                                 registry=r)
    self.generation_tokens = Counter("vllm:generation_tokens",
                                     "Tokens generated for finished requests.", registry=r)
    buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.",
                         buckets=buckets, registry=r)
    self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.",
                          buckets=buckets, registry=r)
    self.tpot = Histogram("vllm:time_per_output_token_seconds", "Seconds per token after the "
                          "first.", buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1,
                                             2.5), registry=r)

  def finished(self, c) -> None:
    self.success.labels(c.finish_reason).inc()
    self.prompt_tokens.inc(c.prompt_tokens)
    self.generation_tokens.inc(len(c.tokens))
    self.e2e.observe(c.finished)
    if c.first_token is not None:
      self.ttft.observe(c.first_token)
      if len(c.tokens) > 1:
        self.tpot.observe((c.finished - c.first_token) / (len(c.tokens) - 1))


# -- the server ---------------------------------------------------------------------------------


def _generation_defaults(model) -> dict:
  """Sampling defaults from the model's generation_config.json (as vLLM does): do_sample false
  -> greedy; else its temperature/top_p/top_k; else OpenAI's (temperature 1)."""
  out = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
  directory = getattr(model, "directory", None)
  try:
    with open(os.path.join(directory, "generation_config.json")) as f:
      cfg = json.load(f)
  except (TypeError, OSError, ValueError):
    return out
  if cfg.get("do_sample") is False:
    out["temperature"] = 0.0
  else:
    for key in ("temperature", "top_p", "top_k"):
      if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
        out[key] = cfg[key]
  return out


class _Server:
  """The state behind the routes: the engine, names, auth, metrics."""

  def __init__(self, engine, model_name: str, api_key: Optional[str], allowed_dirs,
               chat_template: Optional[str], close_timeout: float):
    self.engine = engine
    self.model_name = model_name
    self.api_key = api_key
    self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs]
    self.chat_template = chat_template
    self.close_timeout = close_timeout
    self.created = int(time.time())
    self.closing = False
    self.metrics = _Metrics(engine)
    self.defaults = _generation_defaults(engine.model)
    self.context = engine.model.config.max_position_embeddings
    self.vocab = engine.model.config.vocab_size
    self._token_text: dict = {}
    self._summaries: dict = {}

  async def finished(self, c) -> None:
    """Records a finished request; when its adapter is being unloaded, runs one (empty) engine
    step so the adapter is forgotten now rather than at the next request's step."""
    self.metrics.finished(c)
    if c.adapter is not None:
      with contextlib.suppress(ValueError):
        if self.engine.adapter_info(c.adapter).get("state") == "unloading":
          await asyncio.to_thread(self.engine.step)

  @property
  def tokenizer(self):
    return self.engine.model.tokenizer

  # -- names ------------------------------------------------------------------------------------

  def adapter_of(self, model: Optional[str]) -> Optional[str]:
    """The engine's adapter for a request's `model` (None: the base).

    Raises:
      APIError: 404 for a name that is neither the base nor a served adapter.
    """
    if model is None or model == self.model_name:
      return None
    if model == self.engine.meteora_name:  # the MeteoRA model: its adapters pinned, gated
      return model
    if model in self.engine.store:
      try:
        state = self.engine.adapter_info(model).get("state")
      except ValueError:  # unregistered meanwhile
        state = "gone"
      if state == "serving":
        return model
      raise APIError(404, f"The model `{model}` is being unloaded and takes no new requests.",
                     param="model", code="model_not_found")
    names = self.engine.store.names()
    raise APIError(404, f"The model `{model}` does not exist. Served: `{self.model_name}` "
                        f"(the base) and {len(names)} adapters"
                        f"{' (e.g. ' + ', '.join(names[:5]) + ')' if names else ''}; "
                        f"GET /v1/models lists them.", param="model", code="model_not_found")

  def check_adapter(self, name: str) -> None:
    """Reads (or finds in the host cache) adapter `name` and checks it against the base and the
    pool, so a request for an adapter that cannot be served is refused before it is queued.

    Raises:
      APIError: 422 with the reason.
    """
    from serve.store import AdapterError
    if name == self.engine.meteora_name:
      return  # loaded and checked when the engine started
    try:
      stored = self.engine.store.get(name)
      self.engine.pool.check_adapter(name, stored.adapter)
    except (AdapterError, ValueError) as e:
      if name not in self.engine.store:  # unloaded since adapter_of looked
        raise APIError(404, f"The model `{name}` does not exist (unloaded just now).",
                       param="model", code="model_not_found") from None
      raise APIError(422, f"adapter `{name}` cannot be served: {e}", param="model",
                     code="adapter_incompatible") from None

  def model_card(self, name: Optional[str]) -> dict:
    """The /v1/models entry of the base (None) or of adapter `name`: its parent, rank, targets
    (from the weights once read, from adapter_config.json before), residency and state."""
    card = {"object": "model", "created": self.created, "owned_by": "jaxadapt",
            "max_model_len": self.context}
    if name is None:
      return {"id": self.model_name, **card, "root": getattr(self.engine.model, "directory",
                                                            self.model_name),
              "parent": None}
    info = self.engine.adapter_info(name)
    card.update(id=name, root=info["path"], parent=self.model_name,
                residency=info["residency"], state=info["state"])
    if info.get("kind") == "meteora":
      card.update(kind="meteora", adapters=info["adapters"], top_k=info["top_k"],
                  temperature=info["temperature"])
      return card
    if "rank" in info:
      card.update(rank=info["rank"], ranks=info["ranks"], targets=info["targets"],
                  nbytes=info["nbytes"], digest=info["digest"])
    else:
      key = (info["path"], _mtime(os.path.join(info["path"], "adapter_config.json")))
      if key not in self._summaries:
        self._summaries[key] = _peft_summary(info["path"])
      card.update(self._summaries[key])
    return card

  # -- building engine requests -----------------------------------------------------------------

  def token_text(self, token: int, as_id: bool) -> str:
    """A token as logprobs show it: its text, or `token_id:<id>` (vLLM's
    return_tokens_as_token_ids, and always for a model without a tokenizer)."""
    if as_id or self.tokenizer is None:
      return f"token_id:{token}"
    text = self._token_text.get(token)
    if text is None:
      text = self._token_text[token] = self.tokenizer.decode([token])
    return text

  def sampling(self, req: _Sampling) -> dict:
    """Engine sampling arguments from a request, with the model's defaults, or a 400."""
    for field, neutral in (("presence_penalty", 0), ("frequency_penalty", 0)):
      value = getattr(req, field)
      if value not in (None, neutral):
        raise APIError(400, f"{field} is not supported by jaxadapt (only {neutral} or null); "
                            f"got {value}", param=field, code="unsupported_parameter")
    if req.logit_bias:
      raise APIError(400, "logit_bias is not supported by jaxadapt (only {} or null)",
                     param="logit_bias", code="unsupported_parameter")
    temperature = self.defaults["temperature"] if req.temperature is None else req.temperature
    if temperature < GREEDY_BELOW:
      temperature = 0.0
    top_k = self.defaults["top_k"] if req.top_k is None else req.top_k
    top_k = 0 if top_k < 0 or top_k >= self.vocab else top_k  # -1 or >= vocab: off
    top_p = self.defaults["top_p"] if req.top_p is None else req.top_p
    stop = req.stop
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stop) > MAX_STOPS or any(not s for s in stop):
      raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings; got {stop!r}"[:300],
                     param="stop")
    if stop and self.tokenizer is None:
      raise APIError(400, "stop strings need the model's tokenizer, and this model has none",
                     param="stop")
    return dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                stop=stop, eos_token_id=[] if req.ignore_eos else None)

  def requests(self, prompts: list, req: _Sampling, adapter: Optional[str], max_tokens: int,
               rid: str) -> list:
    """The engine requests of every (prompt, choice), prompt by prompt, each checked.

    Raises:
      APIError: 400 for a request the engine refuses (the engine's message), 404 for an adapter
        unloaded meanwhile.
    """
    from serve.engine import Request
    from serve.store import AdapterError
    kwargs = self.sampling(req)
    if len(prompts) * req.n > MAX_CHOICES:
      raise APIError(400, f"{len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} "
                          f"choices; at most {MAX_CHOICES} per request", param="n")
    out = []
    for prompt in prompts:
      for j in range(req.n):
        seed = req.seed
        if seed is None and kwargs["temperature"] > 0:
          seed = secrets.randbits(32)  # each choice its own draws
        elif seed is not None:
          seed = (seed + j) % 2 ** 32
        r = Request(prompt=prompt, adapter=adapter, max_tokens=max_tokens, seed=seed,
                    request_id=f"{rid}-{len(out)}", **kwargs)
        try:
          self.engine.check(r)
        except AdapterError as e:  # unloaded since adapter_of looked
          raise APIError(404, str(e), param="model", code="model_not_found") from None
        except (ValueError, TypeError) as e:
          raise APIError(400, str(e), param=_param_of(str(e))) from None
        out.append(r)
    return out

  async def submit(self, requests: list) -> list:
    """Queues every request (all or none), or raises 429/503 with a retry hint. Several (n
    choices, a batch of prompts) are queued between two engine steps, on a worker thread, so
    they are admitted together and prefill in one step."""
    if len(requests) == 1:
      return self._submit(requests)
    # Between two engine steps (a worker thread: it may wait for the step in progress).
    return await asyncio.to_thread(self._submit, requests)

  def _submit(self, requests: list) -> list:
    from serve.engine import Overloaded
    from serve.store import AdapterError
    try:
      return self.engine.submit_many(requests)  # all or none
    except AdapterError as e:  # its adapter was unloaded since the request was checked
      raise APIError(404, str(e), param="model", code="model_not_found") from None
    except Overloaded as e:
      status = 503 if (self.closing or self.engine.closed) else 429
      raise APIError(status, str(e), code="overloaded" if status == 429 else "shutting_down",
                     headers={"Retry-After": "1"}) from None


def _mtime(path: str) -> int:
  """The file's mtime in ns (-1 when it is gone): the cache key of a PEFT config's summary."""
  try:
    return os.stat(path).st_mtime_ns
  except OSError:
    return -1


def _param_of(message: str) -> Optional[str]:
  """The request field an engine `check()` message is about (its first field name), if any."""
  for name in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "prompt"):
    if message.startswith(name) or f" {name}" in message:
      return name
  return None


def _completion_error(c) -> APIError:
  """The APIError of a request the engine ended with an error."""
  msg = c.error or "the request failed"
  if msg.startswith("engine error"):
    return APIError(500, msg, code="engine_error")
  return APIError(422, msg, code="request_not_servable")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  """OpenAI's usage object."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
  """One server-sent event as OpenAI streams it: `data: <json>` and a blank line."""
  return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def make_app(engine, *, model_name: str = "default", api_key: Optional[str] = None,
             allowed_dirs=(), chat_template: Optional[str] = None, close_timeout: float = 60.0,
             start_engine: bool = True):
  """The FastAPI app serving `engine` (module docstring).

  Args:
    engine: a `serve.Engine`; started (`engine.start()`) when the app starts unless
      `start_engine` is False, closed (in-flight requests finish) when it stops.
    model_name: the base's name in `model` and /v1/models (adapters may not take it).
    api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
    allowed_dirs: directories that /v1/load_lora_adapter may load from (realpath inside one of
      them); empty: run-time loading is off (403).
    chat_template: a Jinja chat template used instead of the tokenizer's own.
    close_timeout: seconds the shutdown waits for in-flight requests.
  """
  from fastapi import FastAPI
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import PlainTextResponse, Response
  from starlette.exceptions import HTTPException

  if model_name in engine.store:
    raise ValueError(f"the base's name {model_name!r} is also an adapter's; rename one")
  srv = _Server(engine, model_name, api_key, allowed_dirs, chat_template, close_timeout)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if start_engine:
      engine.start()
    yield
    srv.closing = True
    done = await asyncio.to_thread(engine.close, close_timeout)
    if not done:
      log.warning("shutdown: requests still in flight after %.0f s", close_timeout)
    if start_engine:
      await asyncio.to_thread(engine.stop)

  app = FastAPI(title="jaxadapt", version="0.1.0", lifespan=lifespan,
                description="OpenAI-compatible server over the jaxadapt S-LoRA engine.",
                **_fastapi_options(FastAPI))
  app.state.server = srv

  # -- errors: every failure answered as OpenAI does ----------------------------------------------

  @app.exception_handler(APIError)
  async def _api_error(request, exc: APIError):
    return _error_response(exc)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc: RequestValidationError):
    message, param = _validation_message(exc.errors())
    return _error_response(APIError(400, message, param=param))

  @app.exception_handler(HTTPException)
  async def _http_error(request, exc: HTTPException):
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
      message = f"no route {request.method} {request.url.path}; see /docs for the routes"
    return _error_response(APIError(exc.status_code, message,
                                    headers=getattr(exc, "headers", None)))

  @app.exception_handler(Exception)
  async def _unexpected(request, exc: Exception):
    log.exception("request %s %s failed", request.method, request.url.path)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                    code="internal_error"))

  app.add_middleware(_Guard, server=srv)

  # -- routes -----------------------------------------------------------------------------------

  @app.get("/health", responses={503: {"model": ErrorResponse}})
  async def health():
    """200 while the server takes requests; 503 while it shuts down or its engine loop is
    dead."""
    if srv.closing or (start_engine and not engine.loop_alive):
      raise APIError(503, "the server is shutting down" if srv.closing else
                     "the engine loop is not running", code="unavailable")
    return {"status": "ok"}

  @app.get("/metrics", response_class=PlainTextResponse, responses=_ERRORS)
  async def metrics():
    """Prometheus text format: the engine, the pool, the adapter caches, latencies, and the
    inference gateway's vllm:* gauges (docs/serving.md)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    body = await asyncio.to_thread(generate_latest, srv.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models", responses=_ERRORS)
  async def list_models():
    """The base and every adapter (parent, rank, targets, residency, state)."""
    def cards():
      out = [srv.model_card(None)]
      if engine.meteora_name is not None:
        out.append(srv.model_card(engine.meteora_name))
      for name in engine.store.names():
        with contextlib.suppress(ValueError):  # unregistered meanwhile
          out.append(srv.model_card(name))
      return out
    return {"object": "list", "data": await asyncio.to_thread(cards)}

  @app.get("/v1/models/{name:path}", responses=_ERRORS)
  async def get_model(name: str):
    """One model card (404 if unknown)."""
    adapter = srv.adapter_of(name) if name != model_name else None
    return await asyncio.to_thread(srv.model_card, adapter)

  @app.post("/v1/completions", responses=_ERRORS)
  async def completions(body: CompletionRequest, request: HTTPRequest):
    """OpenAI completions: text or token-id prompts, n, stop, seed, logprobs, streaming."""
    return await _completions(srv, body, request)

  @app.post("/v1/chat/completions", responses=_ERRORS)
  async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
    """OpenAI chat completions through the tokenizer's chat template."""
    return await _chat(srv, body, request)

  @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
            responses={**_ERRORS, 403: {"model": ErrorResponse}})
  async def load_lora_adapter(body: LoadLoraAdapterRequest):
    """Registers a PEFT dir under a name (as vLLM): read and checked before anything changes;
    the path must lie inside the allowed dirs."""
    from serve.store import AdapterBusy, AdapterError, AdapterExists
    name = body.lora_name
    if name == model_name or any(c.isspace() for c in name):
      raise APIError(400, f"lora_name {name!r} " + (
          "is the base model's name" if name == model_name else "may not hold whitespace"),
                     param="lora_name")
    if name in engine.store:
      raise APIError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                     param="lora_name", code="adapter_exists")
    path = body.lora_path
    from jaxadapt import default
    try:  # "default:<task>": the embedded models' task adapters (package data)
      embedded = default.resolve_adapter(path)
    except (ValueError, FileNotFoundError) as e:
      raise APIError(404, str(e), param="lora_path", code="adapter_not_found") from None
    path = embedded or confine(path, srv.allowed_dirs)
    try:
      await asyncio.to_thread(engine.load_adapter, name, path)
    except (AdapterExists, AdapterBusy) as e:
      raise APIError(400, str(e), param="lora_name", code="adapter_exists") from None
    except AdapterError as e:
      raise APIError(422, str(e), param="lora_path", code="adapter_incompatible") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

  @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
  async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
    """Takes no new requests for the adapter; those in flight finish, then it is forgotten."""
    from serve.store import AdapterError
    name = body.lora_name
    if name == model_name:
      raise APIError(400, "the base model cannot be unloaded", param="lora_name")
    try:
      await asyncio.to_thread(engine.unload_adapter, name)
    except AdapterError as e:
      raise APIError(404, f"The lora adapter '{name}' cannot be found: {e}", param="lora_name",
                     code="model_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

  return app


def _too_large() -> APIError:
  return APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB",
                  code="request_too_large")


def _fastapi_options(fastapi_cls) -> dict:
  """JSON without a Content-Type header (curl -d), where this FastAPI has the option."""
  import inspect
  params = inspect.signature(fastapi_cls.__init__).parameters
  out = {}
  if "strict_content_type" in params:
    out["strict_content_type"] = False
  return out


class _Guard:
  """ASGI middleware: the API key (every route but /health), the body size limit (413), request
  counting by route, and a last JSON 500 for anything that escaped the handlers."""

  ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
            "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/docs", "/openapi.json")

  def __init__(self, app, server: _Server):
    self.app, self.server = app, server

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope.get("path", "")
    route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")
    status = {"code": 500, "started": False}

    async def tracked(message):
      if message["type"] == "http.response.start":
        status["code"], status["started"] = message["status"], True
      await send(message)

    try:
      key = self.server.api_key
      if key and path != "/health" and not self._authorized(scope, key):
        await _error_response(APIError(
            401, "Incorrect or missing API key: send the header 'Authorization: Bearer "
                 "<key>' (the key given with --api-key or JAXADAPT_API_KEY).",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))(scope, receive,
                                                                              tracked)
        return
      size = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"0")
      if (int(size) if size.isdigit() else 0) > MAX_BODY_BYTES:
        await _error_response(_too_large())(scope, receive, tracked)
        return
      read = [0]

      async def limited():  # a body without Content-Length (chunked) is counted as it comes
        message = await receive()
        read[0] += len(message.get("body", b""))
        if read[0] > MAX_BODY_BYTES:
          raise _too_large()
        return message

      await self.app(scope, limited, tracked)
    except asyncio.CancelledError:  # the client went away before its answer
      if not status["started"]:
        status["code"] = 499
      raise
    except Exception as e:  # noqa: BLE001 -- a request can never crash the server
      if status["started"] or "body_limit" in type(e).__module__:
        raise  # the response is under way, or Starlette's body-size limit signalling itself
      log.exception("unhandled error on %s", path)
      if not status["started"]:
        await _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                       code="internal_error"))(scope, receive, tracked)
    finally:
      self.server.metrics.http.labels(route, str(status["code"])).inc()

  @staticmethod
  def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
      if name == b"authorization":
        scheme, _, token = value.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  key.encode())
    return False


# -- completions and chat -----------------------------------------------------------------------


def _prompts(prompt) -> list:
  """The request's prompts: texts or token-id lists (an empty list is a 400)."""
  if isinstance(prompt, str):
    return [prompt]
  if not prompt:
    raise APIError(400, "prompt must not be empty: give text, texts or token ids",
                   param="prompt")
  if all(isinstance(p, int) for p in prompt):
    return [list(prompt)]
  if any(isinstance(p, list) and not p for p in prompt):
    raise APIError(400, "prompt: a token-id list must not be empty", param="prompt")
  return list(prompt)


def _logprobs_completion(srv: _Server, tokens, logprobs, tops, k: int, as_ids: bool,
                         offset: int) -> dict:
  """OpenAI's completions logprobs object for these tokens (the chosen token is always in its
  top_logprobs, as vLLM does)."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for tok, lp, top in zip(tokens, logprobs, tops):
    text = srv.token_text(tok, as_ids)
    out["tokens"].append(text)
    out["token_logprobs"].append(_finite(lp))
    alts = {srv.token_text(i, as_ids): _finite(v) for i, v in list(top)[:k]}
    alts.setdefault(text, _finite(lp))
    out["top_logprobs"].append(alts)
    out["text_offset"].append(offset)
    offset += len(text)
  return out


def _logprobs_chat(srv: _Server, tokens, logprobs, tops, k: int) -> dict:
  """OpenAI's chat logprobs object (`content`: per token its text, bytes and k alternatives)."""
  content = []
  for tok, lp, top in zip(tokens, logprobs, tops):
    text = srv.token_text(tok, False)
    content.append({"token": text, "logprob": _finite(lp), "bytes": list(text.encode()),
                    "top_logprobs": [{"token": srv.token_text(i, False), "logprob": _finite(v),
                                      "bytes": list(srv.token_text(i, False).encode())}
                                     for i, v in list(top)[:k]]})
  return {"content": content}


def _finite(x: float) -> float:
  """A log-probability JSON can carry (-inf, a token the model rules out, becomes -9999)."""
  return float(x) if math.isfinite(x) else -9999.0  # JSON has no -inf


class _ClientGone(Exception):
  """The client closed its connection before its answer was complete."""


async def _events(srv: _Server, handles: list, request):
  """Yields (index, TokenEvent | Completion) as the engine makes them. Every half second (and
  at most that often between events) it asks whether the client is still there, and raises
  `_ClientGone` when not; every handle not finished is cancelled when the consumer stops."""
  loop = asyncio.get_running_loop()
  queue: asyncio.Queue = asyncio.Queue()
  for i, h in enumerate(handles):
    _pump(loop, queue, i, h)
  getter, checked = None, loop.time()
  try:
    pending = len(handles)
    while pending:
      # One get kept across timeouts (wait_for could drop an item that lands as it times out).
      getter = getter or asyncio.ensure_future(queue.get())
      ready, _ = await asyncio.wait({getter}, timeout=0.5)
      if loop.time() - checked >= 0.5:
        checked = loop.time()
        if await request.is_disconnected():
          raise _ClientGone()
      if not ready:
        continue
      i, item = getter.result()
      getter = None
      if isinstance(item, BaseException):
        raise item
      if hasattr(item, "finish_reason"):
        await srv.finished(item)
        pending -= 1
      yield i, item
  finally:
    if getter is not None:
      getter.cancel()
    for h in handles:
      if not h.done():
        h.cancel()


async def _collect(srv: _Server, handles: list, request) -> list:
  """Every handle's Completion, in order (all cancelled if the client goes away)."""
  done = [None] * len(handles)
  try:
    async for i, item in _events(srv, handles, request):
      if hasattr(item, "finish_reason"):
        done[i] = item
  except _ClientGone:
    raise asyncio.CancelledError("the client went away") from None
  return done


async def _completions(srv: _Server, body: CompletionRequest, request):
  if body.suffix:
    raise APIError(400, "suffix is not supported by jaxadapt", param="suffix",
                   code="unsupported_parameter")
  if body.best_of not in (None, body.n):
    raise APIError(400, f"best_of must equal n ({body.n}) or be null; jaxadapt returns every "
                        f"choice it samples; got {body.best_of}", param="best_of")
  if body.echo and body.logprobs is not None:
    raise APIError(400, "echo with logprobs needs the prompt's logprobs, which jaxadapt does "
                        "not compute; use one of them", param="echo")
  adapter = srv.adapter_of(body.model)
  prompts = _prompts(body.prompt)
  rid = f"cmpl-{uuid.uuid4().hex}"
  reqs = srv.requests(prompts, body, adapter, body.max_tokens, rid)
  if adapter is not None:
    await asyncio.to_thread(srv.check_adapter, adapter)
  echoes = [""] * len(prompts)
  if body.echo:
    tok = srv.tokenizer
    if tok is None and any(not isinstance(p, str) for p in prompts):
      raise APIError(400, "echo of token-id prompts needs the model's tokenizer", param="echo")
    echoes = [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=True)
              for p in prompts]
  model = body.model or srv.model_name
  handles = await srv.submit(reqs)
  k = body.logprobs
  as_ids = bool(body.return_tokens_as_token_ids)
  n = body.n
  if body.stream:
    return _stream_completions(srv, handles, request, rid, model, n, echoes, k, as_ids,
                               include_usage=bool(body.stream_options and
                                                  body.stream_options.include_usage))
  done = await _collect(srv, handles, request)
  for c in done:
    if c.finish_reason == "error":
      raise _completion_error(c)
  choices = []
  for idx, c in enumerate(done):
    echo = echoes[idx // n]
    choice = {"index": idx, "text": echo + (c.text or ""), "logprobs": None,
              "finish_reason": c.finish_reason}
    if k is not None:
      choice["logprobs"] = _logprobs_completion(srv, c.tokens, c.logprobs, c.top_logprobs, k,
                                                as_ids, 0)
    choices.append(choice)
  prompt_tokens = sum(c.prompt_tokens for c in done[::n])
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": choices,
          "usage": _usage(prompt_tokens, sum(len(c.tokens) for c in done))}


def _streaming(gen_factory):
  """An SSE response over the async generator `gen_factory()` makes (no proxy buffering)."""
  from fastapi.responses import StreamingResponse
  return StreamingResponse(gen_factory(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _chunker(rid: str, obj: str, model: str, include_usage: bool):
  """`chunk(choices, usage=None)`: one SSE event of a stream's chunk object `obj`."""
  created = int(time.time())

  def chunk(choices, usage=None):
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
      out["usage"] = usage
    return _sse(out)
  return chunk


def _stream_completions(srv, handles, request, rid, model, n, echoes, k, as_ids,
                        include_usage):
  chunk = _chunker(rid, "text_completion", model, include_usage)

  async def gen():
    offsets = [0] * len(handles)
    done = []
    try:
      for idx in range(len(handles)):
        if echoes[idx // n]:
          yield chunk([{"index": idx, "text": echoes[idx // n], "logprobs": None,
                        "finish_reason": None}])
      async for idx, item in _events(srv, handles, request):
        if hasattr(item, "finish_reason"):
          if item.finish_reason == "error":
            yield _sse(_completion_error(item).body())
            break
          done.append((idx, item))
          yield chunk([{"index": idx, "text": "", "logprobs": None,
                        "finish_reason": item.finish_reason}])
          continue
        if not item.text and k is None:
          continue
        lp = None
        if k is not None:
          lp = _logprobs_completion(srv, [item.token], [item.logprob], [item.top_logprobs], k,
                                    as_ids, offsets[idx])
          offsets[idx] += len(item.text)
        yield chunk([{"index": idx, "text": item.text, "logprobs": lp, "finish_reason": None}])
      else:
        if include_usage:
          prompt_tokens = sum(c.prompt_tokens for i, c in done if i % n == 0)
          yield chunk([], _usage(prompt_tokens, sum(len(c.tokens) for _, c in done)))
    except _ClientGone:
      return  # nobody to tell; its requests are cancelled
    except Exception as e:  # noqa: BLE001 -- the stream has begun: report in-band
      log.exception("stream %s failed", rid)
      yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
    yield "data: [DONE]\n\n"

  return _streaming(gen)


def _chat_prompt(srv: _Server, body: ChatCompletionRequest) -> list:
  """The prompt token ids of the conversation, through the chat template.

  Raises:
    APIError: 400 when the model has no tokenizer or template, or the template refuses the
      messages (its own message, e.g. a role it does not know).
  """
  tok = srv.tokenizer
  template = srv.chat_template or (getattr(tok, "chat_template", None) if tok else None)
  if tok is None or not template:
    raise APIError(400, f"model `{srv.model_name}` has "
                        f"{'no tokenizer' if tok is None else 'no chat template'}, so chat "
                        f"completions cannot build its prompt; use /v1/completions, or start "
                        f"the server with --chat-template FILE", code="no_chat_template")
  messages = []
  for m in body.messages:
    content = m.content
    if isinstance(content, list):
      content = "".join(part.text for part in content)
    msg = {"role": m.role, "content": content or ""}
    if m.name is not None:
      msg["name"] = m.name
    messages.append(msg)
  try:
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                  add_generation_prompt=body.add_generation_prompt is not False,
                                  chat_template=srv.chat_template)
  except Exception as e:  # noqa: BLE001 -- a template's own errors (jinja raise_exception)
    raise APIError(400, f"the chat template refused the messages: {e}", param="messages",
                   code="chat_template_error") from None
  if isinstance(ids, dict) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return [int(t) for t in ids]


async def _chat(srv: _Server, body: ChatCompletionRequest, request):
  if body.tools or body.tool_choice not in (None, "none"):
    raise APIError(400, "tools are not supported by jaxadapt", param="tools",
                   code="unsupported_parameter")
  if body.response_format and body.response_format.get("type") not in (None, "text"):
    raise APIError(400, f"response_format {body.response_format.get('type')!r} is not "
                        f"supported by jaxadapt (only 'text')", param="response_format",
                   code="unsupported_parameter")
  if body.top_logprobs is not None and not body.logprobs:
    raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
  adapter = srv.adapter_of(body.model)
  ids = _chat_prompt(srv, body)
  limit = body.max_completion_tokens or body.max_tokens
  if limit is None:
    limit = max(srv.context - len(ids), 1)  # the rest of the context (as OpenAI and vLLM)
  rid = f"chatcmpl-{uuid.uuid4().hex}"
  reqs = srv.requests([ids], body, adapter, limit, rid)
  if adapter is not None:
    await asyncio.to_thread(srv.check_adapter, adapter)
  model = body.model or srv.model_name
  handles = await srv.submit(reqs)
  k = (body.top_logprobs or 0) if body.logprobs else None
  if body.stream:
    return _stream_chat(srv, handles, request, rid, model, k,
                        include_usage=bool(body.stream_options and
                                           body.stream_options.include_usage))
  done = await _collect(srv, handles, request)
  for c in done:
    if c.finish_reason == "error":
      raise _completion_error(c)
  choices = [{"index": i, "message": {"role": "assistant", "content": c.text or ""},
              "logprobs": None if k is None else _logprobs_chat(srv, c.tokens, c.logprobs,
                                                                c.top_logprobs, k),
              "finish_reason": c.finish_reason} for i, c in enumerate(done)]
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": choices,
          "usage": _usage(done[0].prompt_tokens, sum(len(c.tokens) for c in done))}


def _stream_chat(srv, handles, request, rid, model, k, include_usage):
  chunk = _chunker(rid, "chat.completion.chunk", model, include_usage)

  async def gen():
    done = []
    try:
      for idx in range(len(handles)):
        yield chunk([{"index": idx, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
      async for idx, item in _events(srv, handles, request):
        if hasattr(item, "finish_reason"):
          if item.finish_reason == "error":
            yield _sse(_completion_error(item).body())
            break
          done.append(item)
          yield chunk([{"index": idx, "delta": {}, "logprobs": None,
                        "finish_reason": item.finish_reason}])
          continue
        if not item.text and k is None:
          continue
        lp = None if k is None else _logprobs_chat(srv, [item.token], [item.logprob],
                                                   [item.top_logprobs], k)
        yield chunk([{"index": idx, "delta": {"content": item.text}, "logprobs": lp,
                      "finish_reason": None}])
      else:
        if include_usage:
          yield chunk([], _usage(done[0].prompt_tokens if done else 0,
                                 sum(len(c.tokens) for c in done)))
    except _ClientGone:
      return  # nobody to tell; its requests are cancelled
    except Exception as e:  # noqa: BLE001 -- the stream has begun: report in-band
      log.exception("stream %s failed", rid)
      yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
    yield "data: [DONE]\n\n"

  return _streaming(gen)


# -- running it ---------------------------------------------------------------------------------


class BackgroundServer:
  """A uvicorn server on a thread of this process (tests, the demo, notebooks).

  Attributes:
    url: "http://host:port" (the port the OS gave when port=0).
  """

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import uvicorn
    # log_config=None: the process's logging stays as it is (uvicorn's default config would
    # bind handlers to the sys.stderr of this moment: pytest's capture, a notebook's stream).
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                lifespan="on", log_config=None))
    self.thread = threading.Thread(target=self.server.run, daemon=True,
                                   name="jaxadapt-uvicorn")
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if not self.thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start on {host}:{port}")
      time.sleep(0.02)
    sock = self.server.servers[0].sockets[0]
    self.host, self.port = sock.getsockname()[:2]
    self.url = f"http://{self.host}:{self.port}"

  def stop(self, timeout: float = 60) -> None:
    """Stops accepting, lets requests in flight finish, closes the engine."""
    self.server.should_exit = True
    self.thread.join(timeout)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxadapt serve", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 2)[2])
  p.add_argument("--model", default="default",
                 help="a Hugging Face model dir, a .gguf file, or 'default' (the embedded model "
                      "with its task adapters)")
  p.add_argument("--meteora", default=None, metavar="DIR",
                 help="also serve a MeteoRA model (jaxadapt.meteora: its adapters pinned in the "
                      "pool, every token routed by its gates) as model 'meteora'; 'default' = "
                      "the embedded default's gates")
  p.add_argument("--served-model-name", default=None,
                 help="the base's name in requests (default: --model as given)")
  p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                 help="a PEFT adapter dir (or default:TASK) under a name; repeatable")
  p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                 help="every PEFT dir below DIR, registered lazily (names: relative paths); "
                      "load requests may also load from DIR; repeatable")
  p.add_argument("--allowed-adapter-dir", action="append", default=[], metavar="DIR",
                 help="a directory /v1/load_lora_adapter may load from; repeatable")
  p.add_argument("--pool-mb", type=float, default=256, help="the unified pool's size (MiB)")
  p.add_argument("--max-seqs", type=int, default=32, help="requests in a batch at most")
  p.add_argument("--max-queue", type=int, default=4096,
                 help="requests waiting at most (beyond: 429 with Retry-After)")
  p.add_argument("--reserve", choices=("worst", "none"), default="worst",
                 help="admit a request when the KV of its worst-case length fits (worst), or on "
                      "its prompt alone and preempt when the pool runs out (none, as vLLM)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api-key", default=None,
                 help="require 'Authorization: Bearer KEY' (default: $JAXADAPT_API_KEY)")
  p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                 help="devices one replica shards the model over (S-LoRA Sec. 6), where the "
                      "engine has tensor parallelism")
  p.add_argument("--chat-template", default=None, metavar="FILE",
                 help="a Jinja chat template file, instead of the tokenizer's")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--shutdown-timeout", type=float, default=60,
                 help="seconds SIGTERM waits for requests in flight")
  p.add_argument("--log-level", default="info")
  return p


def build(args) -> tuple:
  """(engine, make_app keyword arguments) from parsed arguments.

  Raises:
    ValueError: a flag that does not fit (the message says which and why).
  """
  import jaxadapt as ja
  from serve.engine import Engine
  import inspect
  tp = {}
  if args.tensor_parallel != 1:
    if "tensor_parallel" not in inspect.signature(Engine).parameters:
      raise ValueError(f"--tensor-parallel {args.tensor_parallel}: this engine serves on one "
                       f"device (tensor-parallel serving is issue #10); use 1")
    tp["tensor_parallel"] = args.tensor_parallel
  adapters = {}
  for item in args.adapter:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--adapter takes NAME=DIR, got {item!r}")
    if name in adapters:
      raise ValueError(f"--adapter name {name!r} is given twice")
    adapters[name] = path
  if args.model == "default" and not args.adapter:
    from jaxadapt import default
    adapters = {task: f"default:{task}" for task in default.TASKS}
  for root in args.adapter_dir:
    for name, path in scan_adapter_dir(root).items():
      if name in adapters:
        raise ValueError(f"adapter name {name!r} from --adapter-dir {root} is taken already")
      adapters[name] = path
  name = args.served_model_name or args.model
  if name in adapters:
    raise ValueError(f"the base's name {name!r} is also an adapter's; pass --served-model-name")
  template = None
  if args.chat_template:
    with open(args.chat_template) as f:
      template = f.read()
  model = ja.load_model(args.model, dtype=args.dtype)
  if args.meteora is not None and name == "meteora":
    raise ValueError("the base's name 'meteora' is the MeteoRA model's; pass --served-model-name")
  engine = Engine(model, adapters=adapters, pool_mb=args.pool_mb, max_seqs=args.max_seqs,
                  max_queue=args.max_queue, reserve=args.reserve, meteora=args.meteora, **tp)
  return engine, dict(model_name=name,
                      api_key=args.api_key or os.environ.get("JAXADAPT_API_KEY") or None,
                      allowed_dirs=list(args.adapter_dir) + list(args.allowed_adapter_dir),
                      chat_template=template, close_timeout=args.shutdown_timeout)


def main(argv=None) -> int:
  """`jaxadapt serve`: serves until SIGTERM or Ctrl-C, then stops admitting, finishes the
  requests in flight and returns 0."""
  import uvicorn
  args = _parser().parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
  try:
    engine, options = build(args)
  except (ValueError, OSError, NotImplementedError) as e:
    print(f"jaxadapt serve: {e}", file=sys.stderr)
    return 2
  app = make_app(engine, **options)
  n = len(engine.store)
  print(f"jaxadapt serve: {options['model_name']} with {n} adapters on "
        f"http://{args.host}:{args.port}/v1" + (" (API key required)" if options["api_key"]
                                               else ""), flush=True)
  # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a
  # clean exit 0 after the graceful shutdown (stop admitting, finish in flight).
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                          lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout)
  uvicorn.Server(config).run()
  print("jaxadapt serve: stopped", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
