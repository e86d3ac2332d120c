"""`make demo` keeps working: the engine serves the embedded default's task adapters, every
answer is checked against the task, and the engine's tokens against `model.generate` alone."""
import re

import jaxadapt.demo


def test_demo_serves_the_default_and_checks_itself(capsys):
  jaxadapt.demo.main(["--tasks", "reverse,upper,count", "--max-tokens", "24"])
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  assert last.startswith("RESULT ok"), out
  right, total = map(int, re.search(r" correct=(\d+)/(\d+)", last).groups())
  base_right = int(re.search(r"base_correct=(\d+)/", last).group(1))
  assert total == 6 and right == total, out      # the adapters solve their tasks
  assert base_right <= 1, out                     # the base alone does not
  assert "12/12 token-for-token equal" in out
