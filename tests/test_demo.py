"""`make demo` keeps working: the server on the embedded default serves an S-LoRA trace over
many adapters through the `openai` client, its table counts what was sent, the task adapters'
live answers equal `default.answer`, and the plot is a real PNG."""
import contextlib
import io
import re

import jaxadapt.demo
from jaxadapt import default


def test_demo_serves_a_trace_through_the_server_and_checks_itself(tmp_path):
  tasks = ("reverse", "upper", "count")
  # Not capsys: uvicorn's logging keeps the streams it was started with, past the fixture's end.
  with contextlib.redirect_stdout(io.StringIO()) as buf:
    jaxadapt.demo.main(["--requests", "40", "--adapters", "100", "--rate", "10",
                        "--tasks", ",".join(tasks), "--out", str(tmp_path)])
  out = buf.getvalue()
  last = out.strip().splitlines()[-1]
  assert last.startswith("RESULT ok"), out
  fields = dict(kv.split("=") for kv in last.split()[2:])
  assert fields["correct"] == "6/6" and fields["adapters"] == "100", last
  assert fields["requests"] == "40" and float(fields["rps"]) > 0, last
  assert 1 <= int(fields["served"]) <= 40, last
  # The table counts the requests sent; every checked answer is the task's right answer.
  assert re.search(r"^  requests +40 \(\+ 6 checked\)$", out, re.M), out
  assert "1001 models" not in out and "lists 101 models" in out, out
  for t in tasks:
    for x in jaxadapt.demo.INPUTS[t]:
      want = f"[{t}] {default.answer(t, x)}"
      assert re.search(rf"^{t} +.*{re.escape(repr(want))} +yes$", out, re.M), (t, x, out)
  png = tmp_path / "demo_serving.png"
  data = png.read_bytes()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", len(data)
