"""Multi-host start-up for the training entry points (`python -m train.<recipe>` on every host).

Call `initialize_from_env()` before any JAX computation. It starts `jax.distributed` when the
environment asks for it, and does nothing otherwise (one process):
  * `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` all set: an explicit launch (any cluster, or several processes on one
    machine); on CPU the collectives go through gloo;
  * `JAXADAPT_DISTRIBUTED=1`: `jax.distributed.initialize()` auto-detects the cluster (TPU pods,
    SLURM, Open MPI, Kubernetes).
After it, `jax.devices()` lists every host's devices and meshes span them all.
"""
from __future__ import annotations

import os

import jax

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env() -> bool:
  """Starts jax.distributed from the environment; returns True if it did.

  Raises:
    ValueError: if only some of the explicit variables are set, or they are not integers.
  """
  present = [k for k in _ENV if os.environ.get(k)]
  if present and len(present) != len(_ENV):
    missing = [k for k in _ENV if k not in present]
    raise ValueError(f"multi-host launch needs all of {_ENV}; found {present}, missing {missing}")
  if present:
    try:
      num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError as e:
      raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers: {e}") from None
    if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=num,
                               process_id=pid)
    return True
  if os.environ.get("JAXADAPT_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False
