"""Fuzzing `jaxadapt serve`: schemathesis cases from the server's own OpenAPI schema (valid and
invalid, >= 500) plus hostile cases of our own (bad JSON, wrong types, huge or non-finite
numbers, unknown adapters, paths out of the allowed dirs, concurrent load/unload of one name while
it generates, clients that disconnect mid-stream). The server answers every one without a 5xx,
every 4xx is an OpenAI JSON error, and well-formed requests in flight meanwhile finish with the
output they have alone.

The model is a tiny random Llama (2 layers, a 64-token context) carrying the default model's byte
tokenizer and chat template, so generation and compiling cost little."""
import shutil
import threading
import time

import httpx
import openai
import pytest

import jaxadapt as ja
from serve import api
from serve.engine import Engine, Request
from _api_helpers import save_lora, tiny_model_with_tokenizer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_KEYS = {"message", "type", "param", "code"}
NEW = 24  # tokens of every well-formed request


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, hf_model_maker):
  """The server over the tiny model with 6 adapters in a pool too small for 8 requests at once
  (admission on the prompt alone: requests are preempted and recomputed under load), and each
  adapter's answer run alone before the server starts."""
  root = tmp_path_factory.mktemp("fuzz")
  base = root / "base"
  hf = tiny_model_with_tokenizer(base, hf_model_maker)
  allowed = root / "allowed"
  names = [f"a{i}" for i in range(6)]
  for i, name in enumerate(names):
    save_lora(hf, allowed / name, seed=i)
  (root / "outside").mkdir()
  shutil.copytree(allowed / "a1", root / "outside" / "a1")
  (allowed / "out").symlink_to(root / "outside" / "a1")
  model = ja.load_model(str(base))
  # 48 usable pages: 2 adapters (8 pages each) and the KV of ~4 requests of 40 tokens.
  engine = Engine(model, adapters={n: str(allowed / n) for n in names}, num_pages=49,
                  reserve="none", max_seqs=8, max_step_tokens=32, max_adapters=8)
  prompts = {None: "hello\n", **{n: f"[reverse] load{i}\n" for i, n in enumerate(names)}}
  want = {n: engine.generate([Request(prompt=p, adapter=n, max_tokens=NEW,
                                      eos_token_id=[])])[0].text for n, p in prompts.items()}
  app = api.make_app(engine, model_name="tiny", api_key=KEY, allowed_dirs=[str(allowed)])
  server = api.BackgroundServer(app)
  client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
  yield dict(app=app, engine=engine, url=server.url, client=client, prompts=prompts, want=want,
             allowed=allowed, names=names)
  server.stop()


class _Traffic:
  """Well-formed greedy requests on a thread while the fuzz runs; each output is checked against
  the request run alone before."""

  def __init__(self, fuzz):
    self.fuzz, self.stop, self.bad, self.done = fuzz, threading.Event(), [], 0
    self.thread = threading.Thread(target=self.run, daemon=True)
    self.thread.start()

  def run(self):
    names = ["a0", None]
    i = 0
    while not self.stop.is_set():
      name = names[i % 2]  # a failure propagates: the thread dies and check() says so
      i += 1
      r = self.fuzz["client"].completions.create(
          model=name or "tiny", prompt=self.fuzz["prompts"][name], max_tokens=NEW,
          temperature=0, extra_body={"ignore_eos": True})
      if r.choices[0].text != self.fuzz["want"][name]:
        self.bad.append((name, r.choices[0].text))
      self.done += 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop.set()
    self.thread.join(60)

  def check(self):
    assert not self.thread.is_alive()
    assert self.bad == [] and self.done > 0, (self.bad, self.done)


def _check(resp, seen):
  """No 5xx; a 4xx is an OpenAI error object."""
  seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
  assert resp.status_code < 500, (resp.status_code, resp.text[:500])
  if resp.status_code >= 400:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body


def test_schemathesis_cases_from_the_openapi_schema(fuzz):
  """>= 500 generated cases (valid and invalid) over every route, with well-formed requests in
  flight: 0 server errors."""
  import schemathesis
  from hypothesis import HealthCheck, Phase, given, settings
  from hypothesis.errors import Unsatisfiable
  from schemathesis import GenerationMode
  schema = schemathesis.openapi.from_dict(fuzz["app"].openapi())
  seen, cases = {}, [0]
  with _Traffic(fuzz) as traffic:
    for result in schema.get_all_operations():
      operation = result.ok()
      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=60, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
          cases[0] += 1
          _check(case.call(base_url=fuzz["url"], headers=AUTH, timeout=60), seen)
        try:
          run()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
          assert mode == GenerationMode.NEGATIVE and not operation.body
  traffic.check()
  print(f"\n{cases[0]} schemathesis cases: {seen}")
  assert cases[0] >= 500, (cases[0], seen)
  assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen), seen


def _post(fuzz, path, body=None, *, content=None, headers=None, timeout=60):
  return httpx.post(fuzz["url"] + path, json=body, content=content, timeout=timeout,
                    headers={**AUTH, **(headers or {})})


def test_hostile_requests(fuzz):
  """Bad JSON, wrong types, huge or non-finite numbers, unknown adapters and paths out of the
  allowed dirs: each a 4xx JSON error, the requests in flight unharmed."""
  seen = {}
  with _Traffic(fuzz) as traffic:
    json_ct = {"content-type": "application/json"}
    raw = ['{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "temperature": -Infinity}',
           '{"prompt": "x", "top_p": Infinity}', '{"prompt": ', '\xff\xfe', '"just a string"',
           "[" * 5000 + "]" * 5000, '{"prompt": "x", "n": 1e400}', "{}", "null",
           '{"prompt": "x", "max_tokens": 99999999999999999999999999}']
    for body in raw:
      for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
        _check(_post(fuzz, path, content=body, headers=json_ct), seen)
    _check(_post(fuzz, "/v1/completions", content=b"{" + b" " * (9 << 20) + b"}",
                 headers=json_ct), seen)
    p = fuzz["prompts"][None]
    bodies = [{"prompt": p, "max_tokens": 10 ** 12}, {"prompt": p, "n": 10 ** 9},
              {"prompt": [p] * 100, "n": 2}, {"prompt": p, "top_k": 10 ** 30, "max_tokens": 2},
              {"prompt": p, "seed": 2 ** 70}, {"prompt": p, "seed": -1, "max_tokens": 2},
              {"prompt": [[10 ** 30]]}, {"prompt": [[-1]]}, {"prompt": [[]]},
              {"prompt": p, "temperature": 1e300}, {"prompt": p, "temperature": "hot"},
              {"prompt": p, "stop": ["x"] * 100}, {"prompt": p, "stop": 3},
              {"prompt": p, "logprobs": -1}, {"prompt": p, "echo": True, "logprobs": 1},
              {"prompt": "x" * 5000}, {"prompt": p, "model": "../a0"},
              {"prompt": p, "model": "a0\x00"}, {"prompt": p, "model": ""},
              {"prompt": p, "stream": "yes"}, {"prompt": p, "stream_options": []},
              {"prompt": {"nested": [1, 2]}}, {"prompt": p, "best_of": 3}]
    for body in bodies:
      _check(_post(fuzz, "/v1/completions", body), seen)
    chats = [{"messages": [{"role": "wizard", "content": "x"}]},
             {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
             {"messages": [{"role": "user"}] * 1000},
             {"messages": [{"role": "system", "content": "x"}]},  # the template refuses it
             {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 9},
             {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
             {"messages": "hello"}]
    for body in chats:
      _check(_post(fuzz, "/v1/chat/completions", body), seen)
    allowed = fuzz["allowed"]
    for path in ("../outside/a1", "out", str(allowed / "out"), "a0/../../outside/a1", "/",
                 "/etc/passwd", "a0\x00", "~", "default:nope", "", "a" * 5000):
      _check(_post(fuzz, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}),
             seen)
    assert "x" not in fuzz["engine"].store
    for name in ("nope", "tiny", "", "a0 b"):
      _check(_post(fuzz, "/v1/unload_lora_adapter", {"lora_name": name}), seen)
  traffic.check()
  # Valid after all: seed -1 (taken mod 2**32) and a top_k beyond the vocabulary (off).
  assert seen.get(200) == 2 and all(400 <= s < 500 for s in seen if s != 200), seen
  assert seen.get(403, 0) >= 6 and seen.get(413, 0) == 1, seen


def test_concurrent_load_unload_of_one_name_while_it_generates(fuzz):
  """Threads load, unload and generate with the same name at once: every answer is a 200 with
  the adapter's own output, or a 4xx saying why (not loaded, being unloaded, loaded already)."""
  seen, outputs, lock = {}, [], threading.Lock()
  stop = time.monotonic() + 5

  def loader():
    while time.monotonic() < stop:
      resp = _post(fuzz, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": "a1"})
      with lock:
        _check(resp, seen)
      resp = _post(fuzz, "/v1/unload_lora_adapter", {"lora_name": "hot"})
      with lock:
        _check(resp, seen)

  def user():
    while time.monotonic() < stop:
      resp = _post(fuzz, "/v1/completions", {"model": "hot", "prompt": fuzz["prompts"]["a1"],
                                              "max_tokens": NEW, "temperature": 0,
                                              "ignore_eos": True})
      with lock:
        _check(resp, seen)
        if resp.status_code == 200:
          outputs.append(resp.json()["choices"][0]["text"])

  threads = [threading.Thread(target=f) for f in (loader, loader, user, user, user)]
  with _Traffic(fuzz) as traffic:
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
  traffic.check()
  assert outputs and set(outputs) == {fuzz["want"]["a1"]}, (len(outputs), set(outputs))
  assert set(seen) <= {200, 400, 404}, seen


def test_disconnects_cancel_and_leave_the_server_whole(fuzz, monkeypatch):
  """Clients that go away mid-stream (6) and while waiting for a whole answer (1): each request
  is cancelled (its pages freed), and the server answers the next one as before."""
  engine = fuzz["engine"]
  before = engine.stats().get("finished_cancelled", 0)
  step = engine.step

  def slow_step():  # 40 tokens take 2 s: the client's 0.3 s timeout leaves mid-answer
    time.sleep(0.05)
    return step()

  monkeypatch.setattr(engine, "step", slow_step)
  with pytest.raises(httpx.ReadTimeout):
    _post(fuzz, "/v1/completions", {"model": "a0", "prompt": fuzz["prompts"]["a0"],
                                    "max_tokens": 40, "ignore_eos": True}, timeout=0.3)
  for i in range(6):
    path = ("/v1/completions", "/v1/chat/completions")[i % 2]
    body = ({"prompt": fuzz["prompts"][None]} if i % 2 == 0 else
            {"messages": [{"role": "user", "content": "hi"}]})
    with httpx.stream("POST", fuzz["url"] + path, headers=AUTH, timeout=60,
                      json={**body, "model": "a0", "max_tokens": 40, "stream": True,
                            "ignore_eos": True}) as resp:
      assert resp.status_code == 200
      next(resp.iter_lines())
  deadline = time.monotonic() + 30
  while (engine.stats().get("finished_cancelled", 0) < before + 7 or engine.stats()["running"])\
      and time.monotonic() < deadline:
    time.sleep(0.05)
  st = engine.stats()
  assert st.get("finished_cancelled", 0) == before + 7, {k: v for k, v in st.items()
                                                          if k.startswith("finished")}
  assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
  r = fuzz["client"].completions.create(model="a0", prompt=fuzz["prompts"]["a0"],
                                        max_tokens=NEW, temperature=0,
                                        extra_body={"ignore_eos": True})
  assert r.choices[0].text == fuzz["want"]["a0"]
  assert httpx.get(fuzz["url"] + "/health").status_code == 200


def test_concurrent_streams_over_every_adapter_preempt_and_lose_nothing(fuzz, monkeypatch):
  """32 streaming clients at once over the 6 adapters and the base, in a pool that holds about
  4 of them: requests are preempted and recomputed, and every stream still ends with the answer
  its request gives alone."""
  engine, client = fuzz["engine"], fuzz["client"]
  before = engine.stats().get("preemptions", 0)
  names = [None] + fuzz["names"]
  got, lock = [], threading.Lock()

  def stream(i):
    name = names[i % len(names)]
    text, reason = "", None
    for ch in client.completions.create(model=name or "tiny", prompt=fuzz["prompts"][name],
                                        max_tokens=NEW, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}):
      text += ch.choices[0].text
      reason = ch.choices[0].finish_reason or reason
    with lock:
      got.append((name, text, reason))

  threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
  # All 32 queued before the next step, so the pool is oversubscribed whatever the timing of
  # the client threads.
  gate, step = threading.Event(), engine.step

  def gated_step():
    gate.wait(60)
    return step()
  monkeypatch.setattr(engine, "step", gated_step)
  for t in threads:
    t.start()
  deadline = time.monotonic() + 60
  while len(engine._incoming) + len(engine.waiting) < 32 and time.monotonic() < deadline:
    time.sleep(0.01)
  gate.set()
  for t in threads:
    t.join(120)
  assert len(got) == 32
  assert [(n, t, r) for n, t, r in got if t != fuzz["want"][n] or r != "length"] == []
  st = engine.stats()
  assert st.get("preemptions", 0) > before, st
  assert st["running"] == 0 and st["waiting"] == 0
