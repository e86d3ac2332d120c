"""Every notebook in colab/ executes top to bottom on CPU (its cells assert their own results)."""
import concurrent.futures
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
# colab/fact.ipynb runs in tests/train/test_fact_train.py, on the tiny FACT run that module
# trains (FACT_RUN), instead of training the same stages a second time here.
NOTEBOOKS = sorted(p for p in (ROOT / "colab").glob("*.ipynb") if p.name != "fact.ipynb")


def _execute(path, cwd, env):
  nb = nbformat.read(str(path), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute(env=env)
  return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebooks two at a time (these machines have 2 cores), each in its own kernel; a test
  waits for its own."""
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": "",  # one CPU device, as on a laptop
         "JAXADAPT_NOTEBOOK_QUICK": "1"}  # the notebooks that train take fewer steps
  with concurrent.futures.ThreadPoolExecutor(min(2, len(NOTEBOOKS))) as pool:
    yield {p.name: pool.submit(_execute, p, tmp_path_factory.mktemp(p.stem), env)
           for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, executed):
  nb = executed[path.name].result()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
