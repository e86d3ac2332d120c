"""Every notebook in colab/ executes top to bottom on CPU (its cells assert their own results)."""
import concurrent.futures

import pytest
from _notebooks import ROOT, execute, kernel_env

# colab/fact.ipynb runs in tests/train/test_fact_train.py, on the tiny FACT run that module
# trains (FACT_RUN), instead of training the same stages a second time here.
NOTEBOOKS = sorted(p for p in (ROOT / "colab").glob("*.ipynb") if p.name != "fact.ipynb")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebooks two at a time (these machines have 2 cores), each in its own kernel; a test
  waits for its own."""
  env = kernel_env(XLA_FLAGS="",  # one CPU device, as on a laptop
                   JAXADAPT_NOTEBOOK_QUICK="1")  # the notebooks that train take fewer steps
  with concurrent.futures.ThreadPoolExecutor(min(2, len(NOTEBOOKS))) as pool:
    yield {p.name: pool.submit(execute, p, tmp_path_factory.mktemp(p.stem), env)
           for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, executed):
  assert not executed[path.name].result()
