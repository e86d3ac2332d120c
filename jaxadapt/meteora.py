"""MeteoRA: many task LoRAs embedded in one frozen model, routed per token by trained gates.

Paper: Xu et al., "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models", ICLR 2025.
N frozen LoRAs sit in every targeted linear layer of a frozen base. A gate in each of those layers
(`W_g: [h_in, N]`, no bias) scores the adapters from that layer's own input, per token (Eq. 3):
`g = x W_g`; the top-k adapters get weights `w = softmax(g_topk / T)` (Eq. 4) and the layer
computes `y = x W + sum_j w_j s_j (x A_j) B_j`. Only the gates train (`train/meteora.py`).

```python
import jaxadapt as ja
model = ja.load_model("default")
m = ja.meteora.build_meteora(model, [f"default:{t}" for t in ja.default.TASKS], top_k=2)
m.generate("[reverse] hello [upper] world\\n").text      # untrained gates: random routing
m = ja.load_meteora("runs/meteora/meteora")             # trained gates (train/meteora.py)
m.generate(prompt, temperature=20.0)                    # T for composite prompts
```

In jaxadapt the router lives in the forward context (`jaxadapt.context.Router`, one per path);
the projection hook evaluates it from the layer's input and runs the mixture on the kernels'
top-k op (`kernels_pallas.lora_topk`: the dense all-adapters form or the per-token gather, by
cost). A MeteoRA model is the frozen base + the N adapters' stacks + the gates; nothing is merged.

Deviation from the paper: gates start at N(0, 1/h_in) (the paper's code draws N(0, 1), which on
this scale gives logits of standard deviation ~sqrt(h_in), ~11 for h_in = 128, so the softmax
starts saturated); see docs/meteora.md for every other choice.

Directory layout (`save_meteora` / `load_meteora`):
  DIR/meteora_config.json   {"format": "jaxadapt-meteora", "version": 1, "adapters": [{"name",
                            "path"}], "top_k", "temperature", "base": {...fingerprint}}
  DIR/gates.safetensors     one [h_in, N] float32 tensor per targeted path (key = the path)
  DIR/adapters/<name>/      each adapter as a PEFT dir (so the dir is self-contained)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.adapters import stack as stack_lib
from jaxadapt.adapters.lora import LoraAdapter, kernel_at
from jaxadapt.context import Context, GateTape, Router

CONFIG_FILE = "meteora_config.json"
GATES_FILE = "gates.safetensors"
FORMAT = "jaxadapt-meteora"
VERSION = 1


def init_gates(model, paths: Sequence[str], num_adapters: int, key: jax.Array) -> dict:
  """Fresh gates `{path: W_g [h_in, N]}` drawn from N(0, 1/h_in) (MeteoRA Eq. 3's W_g; the
  1/sqrt(h_in) scale is ours, see the module docstring)."""
  out = {}
  for i, path in enumerate(paths):
    h_in = kernel_at(model.params, path).shape[0]
    out[path] = jax.random.normal(jax.random.fold_in(key, i), (h_in, num_adapters),
                                  jnp.float32) / np.sqrt(h_in)
  return out


def routed(stacks: Mapping, gates: Mapping, *, temperature, top_k: int,
           tape: Optional[GateTape] = None) -> Context:
  """The MeteoRA forward `Context`: on every gated path the hook evaluates `g = x W_g`, keeps the
  top-k adapters and mixes them with `softmax(g_topk / T)` (MeteoRA Eq. 3-4).

  Args:
    stacks: `jaxadapt.adapters.stack.stack_adapters` of the N adapters.
    gates: {path: W_g [h_in, N]}; only these paths are gated (every adapter path, normally).
    temperature: T, a scalar (traced: a new value does not recompile).
    top_k: k, 1 <= k <= N.
    tape: a `GateTape` to receive every gate's logits (training, routing analysis).
  """
  t = jnp.asarray(temperature, jnp.float32)
  return stack_lib.routed_context(stacks, {
      p: Router(w_gate=w, temperature=t, top_k=top_k, tape=tape) for p, w in gates.items()})


def _check_top_k(top_k, n: int) -> int:
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= top_k <= n:
    raise ValueError(f"top_k must be an int in [1, {n}] (the number of adapters), got {top_k!r}")
  return int(top_k)


def _check_temperature(t) -> float:
  try:
    value = float(t)
  except (TypeError, ValueError):
    value = float("nan")
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"temperature must be a finite float > 0 (MeteoRA Eq. 4's T: 1 for single "
                     f"tasks, 15-30 for composite prompts), got {t!r}")
  return value


class Meteora:
  """A frozen base, N frozen task LoRAs and one gate per targeted linear layer.

  Attributes:
    model: the base (`CausalLM`).
    adapters: the N adapters, in gate-column order.
    names: a name per adapter (column n of every gate is adapter `names[n]`).
    sources: where each adapter was loaded from (`load_adapter` paths), or None.
    gates: {path: W_g [h_in, N]} float32.
    top_k, temperature: the defaults of `context`, `__call__` and `generate`.
    stacks: the adapters stacked per path (`stack_adapters`), what the hook reads.
  """

  def __init__(self, model, adapters: Sequence[LoraAdapter], gates: Mapping[str, jax.Array], *,
               names: Sequence[str], top_k: int = 2, temperature: float = 1.0,
               sources: Optional[Sequence[Optional[str]]] = None):
    self.model = model
    self.adapters = tuple(adapters)
    self.names = tuple(names)
    n = len(self.adapters)
    if n < 1 or len(self.names) != n or len(set(self.names)) != n:
      raise ValueError(f"a MeteoRA model needs >= 1 adapters, each with its own name; got "
                       f"{n} adapters named {list(self.names)}")
    for name, a in zip(self.names, self.adapters):
      if not isinstance(a, LoraAdapter):
        raise TypeError(f"adapter {name!r} is a {type(a).__name__}, expected a LoraAdapter")
      if any("magnitude" in w for w in a.weights.values()):
        raise ValueError(f"adapter {name!r} is a DoRA adapter; MeteoRA mixes plain LoRAs only")
      model.check_adapter(a)
    self.sources = tuple(sources) if sources is not None else (None,) * n
    self.top_k = _check_top_k(top_k, n)
    self.temperature = _check_temperature(temperature)
    self.stacks = stack_lib.stack_adapters(model.params, self.adapters, dtype=model.dtype)
    self.gates = check_gates(model, self.stacks, gates, n)

  @property
  def num_adapters(self) -> int:
    return len(self.adapters)

  @property
  def paths(self) -> list[str]:
    """The gated paths, in the model's layer order."""
    return [p for p in self.model.linear_paths if p in self.gates]

  def with_gates(self, gates: Mapping[str, jax.Array]) -> "Meteora":
    """The same model with other gates (e.g. trained ones)."""
    return Meteora(self.model, self.adapters, gates, names=self.names, top_k=self.top_k,
                   temperature=self.temperature, sources=self.sources)

  def context(self, gates: Optional[Mapping] = None, *, temperature=None,
              top_k: Optional[int] = None, tape: Optional[GateTape] = None) -> Context:
    """The forward `Context` (see `routed`), with this model's gates unless `gates` is given."""
    return routed(self.stacks, self.gates if gates is None else gates,
                  temperature=self.temperature if temperature is None
                  else _check_temperature(temperature),
                  top_k=self.top_k if top_k is None else _check_top_k(top_k, self.num_adapters),
                  tape=tape)

  def __call__(self, input_ids, attention_mask=None, *, temperature=None,
               top_k: Optional[int] = None):
    """Logits [batch, seq, vocab] with every token routed by the gates."""
    return self.model(input_ids, attention_mask,
                      context=self.context(temperature=temperature, top_k=top_k))

  def generate(self, inputs, *, temperature=None, top_k: Optional[int] = None, **kwargs):
    """`model.generate` with the gates routing every token (prompt and answer); `temperature`
    is the gate's T (Eq. 4), not the sampling temperature (`sampling_temperature=`)."""
    if "sampling_temperature" in kwargs:
      kwargs["temperature"] = kwargs.pop("sampling_temperature")
    return self.model.generate(inputs, context=self.context(temperature=temperature,
                                                            top_k=top_k), **kwargs)

  def routing(self, input_ids, attention_mask=None) -> dict:
    """Every gate's logits for a batch: `{path: g [batch, seq, N]}` (the top-1 adapter of each
    token on each path is `argmax`). The forward is jitted once per shape."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    logits = _routing_logits(self.model.graphdef, self.top_k, self.model.params, self.stacks,
                             self.gates, jnp.float32(self.temperature), ids, mask)
    return {p: g.reshape(ids.shape + (self.num_adapters,)) for p, g in logits.items()}

  def save(self, directory: str, *, copy_adapters: bool = True) -> None:
    save_meteora(self, directory, copy_adapters=copy_adapters)


def forward_with_gate_logits(graphdef, params, stacks, gates, input_ids, attention_mask=None, *,
                             temperature=1.0, top_k: int = 1):
  """(logits [B, S, V], {path: gate logits g [B*S, N]}) of one MeteoRA forward, for use inside
  a user's own jit/grad (the gate loss of `train/meteora.py`)."""
  from jaxadapt.causal_lm import forward
  tape = GateTape()
  ctx = routed(stacks, gates, temperature=temperature, top_k=top_k, tape=tape)
  logits = forward(graphdef, params, input_ids, attention_mask, None, ctx)
  return logits, dict(tape.logits)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _routing_logits(graphdef, top_k, params, stacks, gates, temperature, ids, mask):
  return forward_with_gate_logits(graphdef, params, stacks, gates, ids, mask,
                                  temperature=temperature, top_k=top_k)[1]


def gate_cross_entropy(gate_logits: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
  """The gate loss: mean over gates and labelled tokens of `CE(softmax(g_t), task_t)`.

  MeteoRA trains every gate to pick the token's task (the paper's code adds this to the LM loss
  with weight 50; `train/meteora.py`), which is what makes top-1 routing trainable at all: with
  k = 1, Eq. 4's softmax is 1 and the LM loss sends no gradient to the gates.

  Args:
    gate_logits: {path: g [T, N]} (from `forward_with_gate_logits`).
    labels: [T] (or any shape of T elements) int task ids; < 0 = not supervised (e.g. tokens
      before the task tag, which no gate can know).
  """
  labels = labels.reshape(-1)
  keep = labels >= 0
  safe = jnp.where(keep, labels, 0)
  count = jnp.maximum(keep.sum(), 1)
  total = 0.0
  for g in gate_logits.values():
    logp = jax.nn.log_softmax(g.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    total = total + jnp.sum(jnp.where(keep, nll, 0)) / count
  return total / max(len(gate_logits), 1)


def check_gates(model, stacks: Mapping, gates: Mapping, n: int) -> dict:
  """The gates as float32 jax arrays, each checked against its layer (`[h_in, N]`) and the
  adapters (a gate only where some adapter has weights)."""
  out = {}
  missing = [p for p in stacks if p not in gates]
  if missing:
    raise ValueError(f"no gate for {len(missing)} adapter path(s), e.g. {missing[:2]}; every "
                     f"path that an adapter targets needs one")
  for path, w in gates.items():
    if path not in stacks:
      raise ValueError(f"a gate at {path}, where no adapter has weights (adapter paths: "
                       f"{list(stacks)[:3]}...)")
    h_in = kernel_at(model.params, path).shape[0]
    if tuple(np.shape(w)) != (h_in, n):
      raise ValueError(f"the gate at {path} must be [{h_in}, {n}] (the layer's input size, the "
                       f"number of adapters); found {list(np.shape(w))}")
    out[path] = jnp.asarray(w, jnp.float32)
  return out


AdapterSpec = Union[str, LoraAdapter]


def _load(spec: AdapterSpec, model) -> tuple[LoraAdapter, Optional[str], str]:
  """(adapter, source, default name) of a path / "default:task" / LoraAdapter."""
  from jaxadapt.io.peft import load_adapter
  if isinstance(spec, LoraAdapter):
    return spec, None, None
  if not isinstance(spec, (str, os.PathLike)):
    raise TypeError(f"an adapter is a LoraAdapter or the path of a PEFT dir, got "
                    f"{type(spec).__name__}")
  spec = os.fspath(spec)
  adapter = load_adapter(spec, dtype=model.dtype)
  name = spec.split(":", 1)[1] if spec.startswith("default:") else os.path.basename(
      os.path.normpath(spec))
  return adapter, spec, name


def build_meteora(model, adapters: Sequence[AdapterSpec], *, names: Optional[Sequence[str]] = None,
                  top_k: int = 2, temperature: float = 1.0, seed: int = 0,
                  gates: Optional[Mapping] = None) -> Meteora:
  """A MeteoRA model over `model` and `adapters` (PEFT dirs, "default:<task>" names or loaded
  `LoraAdapter`s), with fresh gates on every path an adapter targets (`init_gates`) unless
  `gates` is given.

  Args:
    model: the frozen base (`CausalLM`).
    adapters: the N task adapters (column n of every gate is adapter n).
    names: a name per adapter; default: the dir's name / the default task.
    top_k: k of Eq. 4 (1 or 2 in the paper).
    temperature: T of Eq. 4.
    seed: the gates' init.
    gates: {path: W_g [h_in, N]} to use instead of fresh ones.
  """
  loaded = [_load(a, model) for a in adapters]
  if names is None:
    names = [name or f"adapter_{i}" for i, (_, _, name) in enumerate(loaded)]
  names = [str(n) for n in names]
  if len(names) != len(loaded):
    raise ValueError(f"names holds {len(names)} names for {len(loaded)} adapters")
  ads = [a for a, _, _ in loaded]
  if gates is None:
    paths = [p for p in model.linear_paths if any(p in a.weights for a in ads)]
    gates = init_gates(model, paths, len(ads), jax.random.key(seed))
  return Meteora(model, ads, gates, names=names, top_k=top_k, temperature=temperature,
                 sources=[s for _, s, _ in loaded])


def _fingerprint(model) -> dict:
  """What the gates depend on, and where the base came from ("default" for the embedded one)."""
  from jaxadapt import default as default_lib
  c = model.config
  where = getattr(model, "directory", None)
  with contextlib.suppress(FileNotFoundError):  # no shipped default: the dir is not it
    if where and os.path.realpath(where) == os.path.realpath(default_lib.model_dir()):
      where = "default"
  return {"model_type": c.model_type, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
          "directory": where}


def save_meteora(m: Meteora, directory: str, *, copy_adapters: bool = True) -> None:
  """Writes `m` as a dir (module docstring): the config, the gates and, with `copy_adapters`,
  every adapter as a PEFT dir under `adapters/` (self-contained); without, the config names each
  adapter by where it was loaded from (e.g. "default:reverse": the shipped default's gates)."""
  from safetensors.numpy import save_file
  from jaxadapt.io.peft import save_adapter
  directory = os.fspath(directory)
  if not copy_adapters:
    missing = [n for n, s in zip(m.names, m.sources) if s is None]
    if missing:
      raise ValueError(f"adapters {missing} were given as LoraAdapters, not loaded from a path: "
                       f"save with copy_adapters=True")
  os.makedirs(directory, exist_ok=True)
  entries = []
  for name, adapter, source in zip(m.names, m.adapters, m.sources):
    if copy_adapters:
      rel = os.path.join("adapters", name)
      save_adapter(jax.device_get(adapter), os.path.join(directory, rel))
    else:
      rel = source if source.startswith("default:") else os.path.abspath(source)
    entries.append({"name": name, "path": rel})
  save_file({p: np.asarray(jax.device_get(w), np.float32) for p, w in m.gates.items()},
            os.path.join(directory, GATES_FILE))
  config = {"format": FORMAT, "version": VERSION, "adapters": entries, "top_k": m.top_k,
            "temperature": m.temperature, "base": _fingerprint(m.model),
            "reference": "MeteoRA (Xu et al., ICLR 2025), Eq. 3-4"}
  tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def load_meteora(directory: str, model=None, *, top_k: Optional[int] = None,
                 temperature: Optional[float] = None) -> Meteora:
  """A MeteoRA model from `save_meteora`'s dir ("default": the gates shipped over the embedded
  default's task adapters), on `model` (default: the base the config names).

  Raises:
    FileNotFoundError: no meteora_config.json / gates.safetensors in `directory`.
    ValueError: a config of another format, or a base whose shape differs from the one the gates
      were trained on.
  """
  from safetensors.numpy import load_file
  directory = os.fspath(directory)
  if directory == "default":
    from jaxadapt import default as default_lib
    directory = default_lib.meteora_dir()
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; a MeteoRA dir is written by "
                            f"jaxadapt.meteora.save_meteora (or train/meteora.py)")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != FORMAT or config.get("version") != VERSION:
    raise ValueError(f"{path}: expected format {FORMAT!r} version {VERSION}, found "
                     f"{config.get('format')!r} version {config.get('version')!r}")
  base = config.get("base", {})
  if model is None:
    from jaxadapt.causal_lm import load_model
    where = base.get("directory")
    if not where:
      raise ValueError(f"{path} names no base model dir; pass model=")
    model = load_model(where)
  mine = _fingerprint(model)
  differs = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
             if k in base and base[k] != mine[k]]
  if differs:
    raise ValueError(f"{directory}: the gates were trained on a base with "
                     f"{ {k: base[k] for k in differs} }, this model has "
                     f"{ {k: mine[k] for k in differs} }")
  specs = [e["path"] if e["path"].startswith("default:") else os.path.join(directory, e["path"])
           for e in config["adapters"]]
  names = [e["name"] for e in config["adapters"]]
  gates_path = os.path.join(directory, GATES_FILE)
  if not os.path.isfile(gates_path):
    raise FileNotFoundError(f"{directory}: no {GATES_FILE}")
  gates = load_file(gates_path)
  m = build_meteora(model, specs, names=names, gates=gates,
                    top_k=config["top_k"] if top_k is None else top_k,
                    temperature=config["temperature"] if temperature is None else temperature)
  m.directory = directory
  return m
