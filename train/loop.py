"""The one trainer: any trainable tree against a frozen rest, on a mesh, with exact resume.

Every recipe in `train/` is a thin user of `Trainer`: it builds the trainable tree (a LoRA, gates,
an AGD or FACT adapter, or every parameter of a small base), the frozen tree (the base params, or
`{}`), a loss `loss_fn(trainable, frozen, batch, rng)` and a batch source `batches(position)`,
and calls `Trainer.fit`. The loss is differentiated with respect to `trainable` only; `frozen` is
an ordinary (non-differentiated) argument of the jitted step, never a constant closed over, so no
gradient or optimizer state of the frozen part exists and its buffers are not copied into the
executable.

The run lives in `out_dir`: orbax checkpoints of (trainable, optimizer state) every
`checkpoint_every` steps with a JSON record (step, data position, the recipe's config and
fingerprint), and `metrics.jsonl` (one line per step). Rerunning after a kill resumes from the
latest checkpoint and continues the identical loss curve, because everything a step draws is a
pure function of (seed, step): the batch of `batches(position)` with `position` restored, and
the rng `step_rng(seed, step)`. A checkpoint whose record differs from the run's (other settings,
another base, other data) is refused with a `RunError` naming what differs, before anything is
restored or written.

Compile reuse: `step_function(loss_fn, optimizer, placement)` builds the jitted step once per
distinct (loss, optimizer, shardings) value, the exact inputs of the compiled computation, so
runs whose step is the same computation share one executable (a resume or a repeat in one
process: tests, notebooks) and no run can pick up another's. Give a loss and an optimizer that
compare by value (frozen dataclasses, e.g. `AdamW` here) to get that reuse; a fresh closure per
run is still correct, it only compiles again.

References:
  tunix `PeftTrainer` (one trainer, pluggable loss and trainable tree); AdamW (Loshchilov &
  Hutter, 2019); cosine schedule with warmup (Loshchilov & Hutter, 2017).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import checkpoint as ckpt_lib

DATA_AXIS = "data"  # the mesh axis a batch is split over (jaxadapt.sharding's DATA)


class RunError(ValueError):
  """A run that cannot start as configured (data, out_dir, resume, targets).

  Its message says what was expected, what was found and what to do; the recipes' `main` print
  it without a traceback.
  """


def data_mesh(data_parallel: int):
  """The recipes' (data, model=1) mesh: each batch split over `data_parallel` devices.

  Raises:
    RunError: more devices asked for than there are (the message says what to set).
  """
  from jaxadapt import sharding as sharding_lib
  try:
    return sharding_lib.make_mesh(data_parallel, 1)
  except ValueError as e:
    raise RunError(f"{e}; set --data_parallel to at most the device count") from None


# --- config checks -----------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_numbers(config, *, positive_ints: Sequence[str] = (), ints: Sequence[str] = (),
                  finite: Sequence[str] = ()):
  """Raises ValueError naming the first field of `config` that is not the number it must be.

  Args:
    config: any object with the named attributes (a recipe's frozen dataclass config).
    positive_ints: fields that must be ints >= 1 (bools refused).
    ints: fields that must be ints.
    finite: fields that must be finite ints or floats.
  """
  for name in positive_ints:
    v = getattr(config, name)
    if not _is_int(v) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  for name in ints:
    if not _is_int(getattr(config, name)):
      raise ValueError(f"{name} must be an int, got {getattr(config, name)!r}")
  for name in finite:
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"{name} must be a finite number, got {v!r}")


# --- optimizer -----------------------------------------------------------------------------------

def warmup_cosine_schedule(learning_rate: float, steps: int, warmup_steps: int,
                           final_lr_fraction: float) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `final_lr_fraction` of it.

  With `warmup_steps == steps` the whole run is the warmup (optax's cosine part needs a step).
  """
  if warmup_steps >= steps:
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps, decay_steps=steps,
      end_value=learning_rate * final_lr_fraction)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamW:
  """AdamW on `warmup_cosine_schedule`, after global-norm clipping, as a hashable value.

  It has an optax transformation's `init` and `update` (`.transformation` is the optax object
  itself, for composing), and compares by its settings, so runs with equal settings share one
  compiled train step.
  """
  learning_rate: float            # peak learning rate (after warmup)
  steps: int                      # length of the run: the cosine ends here
  warmup_steps: int = 0           # linear warmup from 0 to learning_rate
  final_lr_fraction: float = 0.1  # the cosine decays to learning_rate * this at the last step
  weight_decay: float = 0.0       # decoupled decay on the leaves decay_mask selects
  grad_clip: float = 1.0          # clip gradients to this global norm; 0 = no clipping
  decay_mask: Optional[Callable] = None  # params -> tree of bools (True = decayed); None = all.
                                         # A module-level function, so equal settings compare equal

  def __post_init__(self):
    check_numbers(self, positive_ints=("steps",), ints=("warmup_steps",),
                  finite=("learning_rate", "final_lr_fraction", "weight_decay", "grad_clip"))
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got "
                       f"{self.warmup_steps}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    if self.grad_clip < 0 or self.weight_decay < 0:
      raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, "
                       f"{self.weight_decay}")

  @property
  def schedule(self) -> optax.Schedule:
    """The learning rate of each (0-based) step."""
    return warmup_cosine_schedule(self.learning_rate, self.steps, self.warmup_steps,
                                  self.final_lr_fraction)

  @functools.cached_property
  def transformation(self) -> optax.GradientTransformation:
    adamw = optax.adamw(self.schedule, weight_decay=self.weight_decay, mask=self.decay_mask)
    if self.grad_clip > 0:
      return optax.chain(optax.clip_by_global_norm(self.grad_clip), adamw)
    return adamw

  def init(self, params):
    return self.transformation.init(params)

  def update(self, updates, state, params=None):
    return self.transformation.update(updates, state, params)


def decay_matrices(params):
  """Weight-decay mask of the matrices (ndim >= 2: kernels, embeddings); norms, biases and
  vectors are not decayed (the usual pre-training rule)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def step_rng(seed, step) -> jax.Array:
  """The rng of step `step` (0-based) of a run: from (seed, step) alone, so a resumed run draws
  the same numbers (e.g. dropout masks).

  Args:
    seed: an int, or the typed key `jax.random.key(seed)`.
    step: int or int32 scalar (traced inside the step).
  """
  is_key = isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype,
                                                                 jax.dtypes.prng_key)
  key = seed if is_key else jax.random.key(seed)
  return jax.random.fold_in(jax.random.fold_in(key, 0x0D), step)


def opt_state_shardings(tx, trainable, mesh: Mesh):
  """Shardings of `tx.init(trainable)`: every trainable-shaped slot follows its trainable leaf;
  counters and other scalars are replicated."""
  shapes = jax.eval_shape(tx.init, trainable)
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, shapes, jax.tree.map(lambda x: x.sharding,
                                                                        trainable),
                               transform_non_params=lambda _: replicated)


# --- the jitted step -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Placement:
  """Shardings of (trainable, opt_state, scalars), hashable: part of a compiled step's key."""
  trainable: tuple   # (treedef, leaves)
  opt_state: tuple
  replicated: NamedSharding

  @classmethod
  def of(cls, trainable_shardings, opt_shardings, replicated):
    flat = lambda t: (jax.tree.structure(t), tuple(jax.tree.leaves(t)))  # noqa: E731
    return cls(flat(trainable_shardings), flat(opt_shardings), replicated)

  def tree(self, which: str):
    treedef, leaves = getattr(self, which)
    return jax.tree.unflatten(treedef, leaves)


def _loss_and_metrics(loss_fn, trainable, frozen, batch, rng):
  """`loss_fn`'s output as (scalar loss, metrics dict)."""
  out = loss_fn(trainable, frozen, batch, rng)
  loss, metrics = out if isinstance(out, tuple) else (out, {})
  if jnp.shape(loss) != ():
    raise ValueError(f"loss_fn must return a scalar loss (or (loss, metrics dict)); got a loss "
                     f"of shape {jnp.shape(loss)}")
  if not isinstance(metrics, Mapping):
    raise ValueError(f"loss_fn's second output must be a dict of scalar metrics, got "
                     f"{type(metrics).__name__}")
  return loss, dict(metrics)


def _train_step(trainable, opt_state, frozen, batch, step, key, *, loss_fn, tx):
  """One optimizer step: gradient of the loss with respect to `trainable` only."""
  (loss, metrics), grads = jax.value_and_grad(
      functools.partial(_loss_and_metrics, loss_fn), has_aux=True)(
          trainable, frozen, batch, step_rng(key, step))
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss, metrics


def _build_step(loss_fn, tx, placement: _Placement):
  """`_train_step` jitted for (loss, optimizer, placement): state donated, outputs placed."""
  return jax.jit(functools.partial(_train_step, loss_fn=loss_fn, tx=tx),
                 out_shardings=(placement.tree("trainable"), placement.tree("opt_state"),
                                placement.replicated, placement.replicated),
                 donate_argnums=(0, 1))


def _build_init(tx, placement: _Placement):
  """`tx.init` jitted with the optimizer state placed."""
  return jax.jit(tx.init, out_shardings=placement.tree("opt_state"))


# The jitted steps, keyed by exactly what a compiled step is a function of: (loss, optimizer,
# placement). Runs that share the key (a resume or a repeat in one process: tests, notebooks)
# share the executable, and no run can pick up another's. `jitted_step.cache_clear()` drops them.
jitted_step = functools.lru_cache(maxsize=16)(_build_step)
_jitted_init = functools.lru_cache(maxsize=16)(_build_init)


def step_function(loss_fn, tx, placement: _Placement):
  """The jitted `_train_step` of (loss, optimizer, placement), built once per distinct value
  (a loss or optimizer that cannot be hashed gets a fresh one, compiled for this run alone).

  Returns:
    `(step, init)`: `step(trainable, opt_state, frozen, batch, step, key) -> (trainable,
    opt_state, loss, metrics)` with `trainable` and `opt_state` donated and placed on
    `placement`, and `init(trainable) -> opt_state` placed likewise.
  """
  try:
    hash((loss_fn, tx, placement))
  except TypeError:
    return _build_step(loss_fn, tx, placement), _build_init(tx, placement)
  return jitted_step(loss_fn, tx, placement), _jitted_init(tx, placement)


# --- resume checks -------------------------------------------------------------------------------

def _json(value):
  """`value` as it reads back from JSON (tuples become lists), so records compare as saved."""
  return json.loads(json.dumps(value, default=str))


def check_resume(saved: Mapping, record: Mapping, out_dir: str, *,
                 resumable: Sequence[str] = ()):
  """Raises RunError unless a checkpoint's record fits the run being started.

  Args:
    saved: the checkpoint's JSON record.
    record: the run's record: `{"config": {...}, **fingerprint}`. Every config field except
      `resumable` must equal the saved one; every other key present in both must be equal (a
      model dir or data file changed in place is caught by its fingerprint).
    out_dir: named in the error.
    resumable: config fields that may differ (they do not change the loss curve).
  """
  record = _json(dict(record))
  saved_config, config = saved.get("config", {}), record.get("config", {})
  diff = {k: (saved_config.get(k), v) for k, v in config.items()
          if k not in resumable and saved_config.get(k) != v}
  for k, v in record.items():
    if k != "config" and k in saved and saved[k] != v:
      big = isinstance(v, dict)  # e.g. a model architecture: named, not printed
      diff[k] = ("<as saved>" if big else saved[k], "<changed>" if big else v)
  if diff:
    raise RunError(f"{out_dir} has a checkpoint of a different run; resuming it with "
                   f"{ {k: v[1] for k, v in diff.items()} } (it was "
                   f"{ {k: v[0] for k, v in diff.items()} }) would not continue its loss "
                   f"curve. Use a new --out_dir, or the same settings and inputs.")


def prepare_out_dir(out_dir: str):
  """Creates `out_dir` (if needed) and checks it is a writable directory."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise RunError(f"--out_dir {out_dir}: expected a directory (or a path to create), found a "
                   f"file. Pick another --out_dir.")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise RunError(f"--out_dir {out_dir}: cannot create it ({e.strerror}). Pick a writable "
                   f"--out_dir.") from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise RunError(f"--out_dir {out_dir}: the directory is not writable. Pick a writable "
                   f"--out_dir.")


# --- the trainer ---------------------------------------------------------------------------------

@dataclasses.dataclass
class FitResult:
  """What `Trainer.fit` returns."""
  losses: list            # loss of each step this call ran, in order
  first_step: int         # 1-based step of losses[0] (> 1 after a resume)
  trainable: Any          # the trained tree (on the mesh)
  opt_state: Any          # the optimizer state (trainable-shaped slots sharded like trainable)
  metrics: list           # the metrics.jsonl rows of the steps this call ran


class Trainer:
  """A run in `out_dir`: checkpoints, metrics log and progress bar around `fit`.

  Open it first (it creates `out_dir` and reads its checkpoints, no model needed), check the
  run's config against a checkpoint with `check_resume` before building anything slow, then
  `fit`. Use it as a context manager, or call `close`.
  """

  def __init__(self, out_dir: str, *, steps: int, checkpoint_every: int,
               keep_checkpoints: int = 2, log_every: int = 10, progress: bool = True,
               desc: str = "train", resumable: Sequence[str] = ()):
    """Args:
      out_dir: the run's dir: `checkpoints/` and `metrics.jsonl` go here (created if needed).
      steps: optimizer steps in the whole run.
      checkpoint_every: save (trainable, optimizer state, data position) every this many steps
        (and at the last step).
      keep_checkpoints: newest checkpoints kept on disk.
      log_every: fetch losses to the host, log them and move the progress bar this often.
      progress: show the tqdm progress bar (on the chief process).
      desc: the progress bar's label (the recipe's name).
      resumable: config fields that may differ between a run and its resume.
    """
    for name, v in (("steps", steps), ("checkpoint_every", checkpoint_every),
                    ("keep_checkpoints", keep_checkpoints), ("log_every", log_every)):
      if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    self.out_dir, self.steps, self.log_every = out_dir, steps, log_every
    self.progress, self.desc, self.resumable = progress, desc, tuple(resumable)
    prepare_out_dir(out_dir)
    self.checkpoints = ckpt_lib.Checkpoints(os.path.join(out_dir, "checkpoints"),
                                            every=checkpoint_every, keep=keep_checkpoints)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self.checkpoints.close()

  @property
  def latest_step(self) -> int:
    """The step of the newest complete checkpoint, 0 if none (a fresh run)."""
    return self.checkpoints.latest_step() or 0

  def check_resume(self, record: Mapping) -> int:
    """Raises RunError unless the newest checkpoint (if any) fits `record`; returns its step.

    Args:
      record: `{"config": {...}}`, optionally with fingerprint keys (see `check_resume`).
    """
    start = self.latest_step
    if start:
      check_resume(self.checkpoints.record(start), record, self.out_dir,
                   resumable=self.resumable)
    return start

  def refuse_to_overwrite(self, name: str, what: str):
    """Raises RunError if `out_dir/name` exists but no checkpoint does: a finished run's export
    (`what`, e.g. "an exported adapter") that a fresh run would overwrite."""
    if not self.latest_step and os.path.exists(os.path.join(self.out_dir, name)):
      raise RunError(f"--out_dir {self.out_dir} holds {what} but no checkpoint to resume; a new "
                     f"run would overwrite it. Use a new --out_dir, or move {name}/ away.")


  def _restore(self, step: int, trainable, opt_state):
    """(trainable, opt_state) saved at `step`, placed like the given ones."""
    try:
      state, _ = self.checkpoints.restore(step, {"trainable": trainable, "opt_state": opt_state})
      return state["trainable"], state["opt_state"]
    except Exception as first:  # pylint: disable=broad-except
      # train/lora.py's checkpoints from before the shared trainer name the tree "weights".
      try:
        state, _ = self.checkpoints.restore(step, {"weights": trainable, "opt_state": opt_state})
      except Exception:  # pylint: disable=broad-except
        raise first from None
      return state["weights"], state["opt_state"]
  def fit(self, loss_fn: Callable, optimizer, trainable, frozen,
          batches: Callable[[int], Mapping[str, np.ndarray]], *, mesh: Mesh, batch_size: int,
          record: Mapping, seed: int = 0, trainable_sharding=None, frozen_sharding=None,
          batch_sharding=None, learning_rate: Optional[Callable] = None,
          stop_after: Optional[int] = None) -> FitResult:
    """Trains `trainable` for the run's steps (from its newest checkpoint, if any).

    Args:
      loss_fn: `loss_fn(trainable, frozen, batch, rng) -> loss` or `(loss, {name: scalar})`;
        the metrics are logged beside the loss. Hashable; equal losses share a compile.
      optimizer: an optax transformation (`init`, `update`), hashable (e.g. `AdamW`).
      trainable: the initial tree that trains (jax arrays; host arrays are replicated). Its
        buffers are donated to the step: do not use them after `fit`.
      frozen: the tree the loss reads but does not train (`{}` for none).
      batches: `batches(position) -> {name: host array [batch_size, ...]}`, the global batch of
        examples `position .. position + batch_size - 1`; a pure function of `position`.
      mesh: the mesh the run uses.
      batch_size: global batch (rows); `position` advances by it each step.
      record: `{"config": {...}, **fingerprint}`, saved in every checkpoint and compared with
        the newest one's before anything is restored (RunError naming what differs).
      seed: the per-step rng is `step_rng(seed, step)`.
      trainable_sharding, frozen_sharding: pytrees of shardings to place the trees on; default:
        where they already are (host arrays replicated).
      batch_sharding: the batch's sharding; default rows split over the mesh's `data` axis.
      learning_rate: `schedule(step)`, logged per step when given.
      stop_after: stop once this many steps are done (checkpoints already started complete): a
        stand-in for killing the process (tests).

    Returns:
      FitResult; `losses` is empty when the run had already finished.
    """
    chief = jax.process_index() == 0  # multi-host: one process writes the log
    replicated = NamedSharding(mesh, P())
    trainable = _place(trainable, trainable_sharding, mesh)
    frozen = _place(frozen, frozen_sharding, mesh)
    if batch_sharding is None:
      batch_sharding = NamedSharding(mesh, P(DATA_AXIS) if DATA_AXIS in mesh.axis_names else P())
    t_sh = jax.tree.map(lambda x: x.sharding, trainable)
    o_sh = opt_state_shardings(optimizer, trainable, mesh)
    placement = _Placement.of(t_sh, o_sh, replicated)
    step_fn, init_fn = step_function(loss_fn, optimizer, placement)
    opt_state = init_fn(trainable)

    start = self.latest_step
    position = 0
    if start:
      saved = self.checkpoints.record(start)
      check_resume(saved, record, self.out_dir, resumable=self.resumable)
      trainable, opt_state = self._restore(start, trainable, opt_state)
      position = int(saved["examples_seen"])
    record = _json(dict(record))
    log = (ckpt_lib.MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"), resume_step=start)
           if chief else None)
    end = self.steps if stop_after is None else min(self.steps, stop_after)
    key = jax.random.key(seed)

    from tqdm.auto import tqdm
    bar = tqdm(total=self.steps, initial=start, desc=self.desc, unit="step",
               disable=not (self.progress and chief), dynamic_ncols=True)
    losses, rows, pending = [], [], []

    def flush():
      if not pending:
        return
      values = jax.device_get([(loss, metrics) for _, loss, metrics in pending])
      new = []
      for (s, _, _), (loss, metrics) in zip(pending, values):
        row = {"step": s, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        if learning_rate is not None:
          row["learning_rate"] = float(learning_rate(s - 1))
        row["time"] = time.time()
        new.append(row)
      if log is not None:
        log.write(new)
      losses.extend(r["loss"] for r in new)
      rows.extend(new)
      bar.update(len(new))
      bar.set_postfix(loss=f"{new[-1]['loss']:.4f}")
      pending.clear()

    try:
      for step in range(start, end):
        batch = _device_batch(batches(position), batch_size, batch_sharding, position)
        trainable, opt_state, loss, metrics = step_fn(trainable, opt_state, frozen, batch,
                                                      jnp.asarray(step, jnp.int32), key)
        position += batch_size
        done = step + 1
        pending.append((done, loss, metrics))
        last = done == self.steps
        if (len(pending) >= self.log_every or done % self.checkpoints.every == 0 or last):
          flush()
        self.checkpoints.save(done, {"trainable": trainable, "opt_state": opt_state},
                              {"step": done, "examples_seen": position, **record}, force=last)
      flush()
    finally:
      bar.close()
      self.checkpoints.wait()
    return FitResult(losses=losses, first_step=start + 1, trainable=trainable,
                     opt_state=opt_state, metrics=rows)


def _place(tree, shardings, mesh: Mesh):
  """`tree` on `shardings`, or where its arrays already are on `mesh` (others replicated)."""
  if shardings is not None:
    return jax.device_put(tree, shardings)
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, replicated)
  return jax.tree.map(put, tree)


def _device_batch(host: Mapping[str, np.ndarray], batch_size: int, sharding, position: int):
  """The global host batch as jax arrays on `sharding` (each process reads its own rows)."""
  out = {}
  for name, value in host.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] != batch_size:
      raise ValueError(f"batches({position})[{name!r}] has shape {value.shape}; expected the "
                       f"global batch of batch_size={batch_size} rows first")
    out[name] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
  return out


def run_main(argv: Sequence[str], *, config_from_argv: Callable, train: Callable,
             outputs: Optional[Callable[[Any], str]] = None,
             summary: Optional[Callable[[Any, Any], str]] = None) -> int:
  """The body of a recipe's `main`: parse, start multi-host, train, print one summary line.

  A bad command line or a `RunError` / missing file prints `error: ...` (no traceback) and
  returns 2.

  Args:
    argv: the arguments after the program name.
    config_from_argv: argv -> config (raises `flags.FlagError` / ValueError).
    train: config -> a result with `losses` and `first_step`.
    outputs: config -> where the run's outputs are, for the summary line.
    summary: (config, result) -> what to print instead of the loss line (a recipe whose result
      is a table, not a loss curve).
  """
  from train import distributed, flags
  try:
    config = config_from_argv(argv)
    distributed.initialize_from_env()  # multi-host: before any JAX computation
  except (flags.FlagError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    result = train(config)
  except (FileNotFoundError, RunError) as e:  # e.g. a wrong --data: no traceback needed
    print(f"error: {e}", file=sys.stderr)
    return 2
  if summary is not None:
    print(summary(config, result))
  elif result.losses:
    print(f"steps {result.first_step}..{config.steps}: loss {result.losses[0]:.4f} -> "
          f"{result.losses[-1]:.4f}; {outputs(config)}")
  else:
    print(f"{config.out_dir} already finished all {config.steps} steps; {outputs(config)}")
  return 0
