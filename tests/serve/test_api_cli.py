"""`jaxadapt serve` as a process: `--adapter-dir` registers every PEFT dir below it and nothing a
symlink reaches outside it, `JAXADAPT_API_KEY` guards the routes, `--tensor-parallel 2` serves the
same tokens as one device, and SIGTERM stops admitting, lets the stream in flight finish and
exits 0."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from _api_helpers import save_lora, tiny_model_with_tokenizer
from serve import api

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_cli_flags_are_checked(tmp_path):
  bad = ((["--adapter", "noequals"], "NAME=DIR"),
         (["--adapter", "a=default:reverse", "--adapter", "a=default:upper"], "given twice"),
         (["--adapter-dir", str(tmp_path / "none")], "expected a directory"),
         (["--adapter-dir", str(tmp_path)], "no PEFT adapter dir"),
         (["--adapter", "default=default:reverse"], "--served-model-name"))
  for argv, match in bad:
    args = api._parser().parse_args(argv)
    with pytest.raises(ValueError, match=match):
      api.build(args)


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(tmp_path, hf_model_maker):
  """The server on 2 devices (tensor parallel; the tests' 8 simulated CPU devices): its greedy
  tokens equal one device's engine; SIGTERM lets the stream in flight finish, then exits 0."""
  hf = tiny_model_with_tokenizer(tmp_path / "base", hf_model_maker)
  adapters, outside = tmp_path / "adapters", tmp_path / "outside"
  save_lora(hf, adapters / "a0", seed=0)
  save_lora(hf, adapters / "team" / "a1", seed=1)
  save_lora(hf, outside / "secret", seed=2)
  (adapters / "link").symlink_to(outside)
  port = _free_port()
  env = {**os.environ, "JAXADAPT_API_KEY": "k", "PYTHONPATH": REPO}
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxadapt.cli", "serve", "--model", str(tmp_path / "base"),
       "--served-model-name", "tiny", "--adapter-dir", str(adapters), "--port", str(port),
       "--pool-mb", "2", "--max-seqs", "4", "--tensor-parallel", "2",
       "--log-level", "warning"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read()
      with contextlib.suppress(httpx.TransportError):  # not listening yet
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          break
      assert time.monotonic() < deadline, "the server did not come up"
      time.sleep(0.2)
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()["data"]
    assert sorted(m["id"] for m in models) == ["a0", "team/a1", "tiny"]  # not link/secret
    r = httpx.post(url + "/v1/completions", headers=auth, timeout=120,
                   json={"model": "a0", "prompt": "hello\n", "max_tokens": 8, "temperature": 0,
                         "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True})
    got = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    import jaxadapt as ja
    from serve.engine import Engine, Request
    one = Engine(ja.load_model(str(tmp_path / "base")), adapters={"a0": str(adapters / "a0")},
                 pool_mb=2, prefetch=False)
    assert got == one.generate([Request(prompt="hello\n", adapter="a0", max_tokens=8,
                                        eos_token_id=[])])[0].tokens
    body = {"model": "team/a1", "prompt": "hello\n", "max_tokens": 40, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", headers=auth, json=body,
                      timeout=120) as resp:
      lines = resp.iter_lines()
      first = next(lines)
      proc.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
    assert len(rest) > 5  # the stream went on after SIGTERM
    events = [first] + rest
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
    out = proc.stdout.read()
    assert "jaxadapt serve: stopped" in out, out
    with pytest.raises(httpx.TransportError):
      httpx.get(url + "/health", timeout=5)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
