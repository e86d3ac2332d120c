"""Runs a colab/ notebook top to bottom in its own kernel (test_colab, test_fact_train)."""
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def kernel_env(**extra) -> dict:
  """This process's environment with the repo on PYTHONPATH, plus `extra`."""
  return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
          **extra}


def execute(path, cwd, env) -> list:
  """Executes notebook `path` in `cwd` with `env`; returns the error outputs of its cells
  (each cell asserts its own results)."""
  nb = nbformat.read(str(path), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute(env=env)
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if o.get("output_type") == "error"]
