"""`make demo` keeps working: the demo's mixed batch equals per-sequence runs (it checks itself)."""
import jaxadapt.demo


def test_demo_runs_and_checks_itself(capsys):
  jaxadapt.demo.main(["--adapters", "3", "--batch", "4", "--seq", "8"])
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  assert last.startswith("RESULT ok"), out
  err = float(out.split("max |mixed - per-sequence| = ")[1].split()[0])
  assert err < 1e-4
