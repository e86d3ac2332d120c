"""Train-state checkpoints (orbax-checkpoint) and the JSON-lines metrics log, for exact resume.

A checkpoint at step `s` holds the trainable state (a pytree of arrays: adapter weights and
optimizer state) and a JSON record (step, data position, the config that made it). Orbax writes
each step to a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Saves and restores `(state pytree, record dict)` under `directory`, one dir per step."""

  def __init__(self, directory: str, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint interval must be >= 1 step, got {every}")
    self.every = every
    # Every `every` steps (and on a preemption notice), without orbax's default extra save at
    # the first step of a fresh run.
    policies = ocp.checkpoint_managers
    policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                     policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep,
                                           cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "record"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, record: dict, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of the interval (or `force`); returns whether it did."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=force)

  def record(self, step: int) -> dict:
    """The JSON record saved at `step`, without reading the state (to check it first)."""
    out = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out["record"])

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """The state at `step`, placed like `like` (same tree, shapes, dtypes and shardings)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    return out["state"], dict(out["record"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    # The manager starts removing stale tmp dirs in a thread at construction, and its close()
    # does not wait for it (orbax 0.12): a run that stops right away (a bad --model_dir) then
    # exits with a traceback from that thread ("cannot schedule new futures after shutdown").
    cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
    if cleanup is not None:
      cleanup.result()
    self.manager.close()


class MetricsLog:
  """`metrics.jsonl`: one JSON object per step. On resume, lines after the restored step go.

  A last line cut short (the process was killed while writing it) is dropped; it belongs to a
  step after the checkpoint, which the resumed run logs again.
  """

  def __init__(self, path: str, *, resume_step: int):
    self.path = path
    kept = []
    if resume_step > 0 and os.path.exists(path):
      with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
      for n, (i, line) in enumerate(lines):
        try:
          row = json.loads(line)
          step = int(row["step"])
        except (ValueError, KeyError, TypeError) as e:
          if n == len(lines) - 1 and not line.endswith("\n"):
            break  # a partial write at the kill
          raise ValueError(f"{path}:{i}: expected a JSON object with an integer 'step', found "
                           f"{line.strip()[:80]!r} ({e}). Fix or delete that line, then rerun "
                           f"to resume.") from None
        if step <= resume_step:
          kept.append(line if line.endswith("\n") else line + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Write-then-rename: a kill here leaves the old log or the new one, never a truncated one.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def write(self, rows: list[dict]):
    with open(self.path, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_tensors(path: str, tensors: dict, info: dict) -> None:
  """Writes `path` (.safetensors of `{name: array}`) and `path` with .json (`info`): the small
  models the recipes train besides their adapters (judges, classifiers)."""
  import numpy as np
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.asarray(v) for k, v in tensors.items()}, path)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump(info, f, indent=2)


def load_tensors(path: str, want: dict, what: str) -> tuple[dict, dict]:
  """Reads what `save_tensors` wrote: (tensors, info); the tensor names and shapes must be
  `want` ({name: shape}).

  Raises:
    FileNotFoundError: no file at `path` (the message names `what` should have written it).
    ValueError: other tensor names or shapes.
  """
  from safetensors.numpy import load_file
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no {what}")
  tensors = load_file(path)
  got = {k: tuple(v.shape) for k, v in tensors.items()}
  want = {k: tuple(v) for k, v in want.items()}
  if got != want:
    raise ValueError(f"{path}: expected tensors {sorted(want.items())}, found "
                     f"{sorted(got.items())}")
  info_path = os.path.splitext(path)[0] + ".json"
  info = {}
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
  return tensors, info
