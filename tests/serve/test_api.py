"""`jaxadapt serve` through the unchanged `openai` client: one server on 127.0.0.1 over the
embedded default and its task adapters. Greedy answers equal the engine's own and transformers +
PEFT `generate` token for token; errors come back as OpenAI's, with their status codes; adapters
load and unload while others generate; /metrics carries the inference gateway's gauges."""
import copy
import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

import jaxadapt as ja
from jaxadapt import default
from serve import api
from serve.engine import Engine, Request

KEY = "test-key"
TASKS = ("reverse", "upper", "sort")


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_model_maker):
  """The server (API key on, load requests confined to `allowed/`), its engine, an openai
  client, and the dirs the load tests use: a copy of `reverse`, an adapter for another base, a
  symlink out of `allowed/` and a dir outside it."""
  from peft import LoraConfig, get_peft_model
  root = tmp_path_factory.mktemp("api")
  allowed, outside = root / "allowed", root / "outside"
  allowed.mkdir()
  outside.mkdir()
  shutil.copytree(default.adapter_dir("reverse"), allowed / "rev2")
  shutil.copytree(default.adapter_dir("upper"), outside / "up2")
  os.symlink(outside / "up2", allowed / "escape")
  tiny = hf_model_maker("llama", str(root / "tiny"), seed=3)
  foreign = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, target_modules=["q_proj"]))
  foreign.save_pretrained(str(allowed / "foreign"))
  model = ja.load_model("default")
  adapters = {t: f"default:{t}" for t in TASKS + ("count",)}
  # Few shape buckets (steps of at most 16 tokens, requests of at most 72 tokens = 4 KV blocks),
  # so the module compiles a handful of step programs.
  engine = Engine(model, adapters=adapters, pool_mb=16, max_seqs=8, max_step_tokens=16)
  server = api.BackgroundServer(api.make_app(engine, model_name="default", api_key=KEY,
                                             allowed_dirs=[str(allowed)]))
  client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
  yield dict(engine=engine, server=server, client=client, url=server.url, root=root,
             allowed=allowed, outside=outside, model=model)
  server.stop()
  print(f"\n{Engine.compiled_programs()} step programs compiled")


@pytest.fixture(scope="module")
def peft_model():
  """transformers' Llama from the default's files with its task adapters (PEFT)."""
  import transformers
  from peft import PeftModel
  hf = transformers.LlamaForCausalLM.from_pretrained(default.model_dir()).eval()
  multi = PeftModel.from_pretrained(hf, default.adapter_dir(TASKS[0]), adapter_name=TASKS[0])
  for t in TASKS[1:]:
    multi.load_adapter(default.adapter_dir(t), adapter_name=t)
  return multi.eval()


@pytest.fixture
def slow_steps(world, monkeypatch):
  """Engine steps 0.05 s apart: what a test must observe mid-request lasts seconds, not ms."""
  step = world["engine"].step

  def slow_step():
    time.sleep(0.05)
    return step()

  monkeypatch.setattr(world["engine"], "step", slow_step)


def _auth(**headers):
  return {"Authorization": f"Bearer {KEY}", **headers}


def _peft_greedy(peft_model, ids, adapter, max_new):
  with torch.no_grad():
    out = peft_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                             dtype=torch.long),
                              do_sample=False, max_new_tokens=max_new, eos_token_id=258,
                              pad_token_id=256, adapter_names=[adapter or "__base__"])
  return [int(t) for t in out[0, len(ids):]]


def _ids(choice):
  return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def test_greedy_completions_equal_engine_and_peft(world, peft_model):
  """Each adapter (and the base) through /v1/completions: the token ids equal the engine's
  `generate` and transformers + PEFT's greedy `generate`; the adapters' texts are their
  tasks' answers."""
  client, engine, tok = world["client"], world["engine"], world["model"].tokenizer
  words = {"reverse": "jaxadapt", "upper": "serving", "sort": "lora"}
  cases = [(t, default.prompt(t, words[t])) for t in TASKS] + [(None, "[reverse] abc\n")]
  for adapter, prompt in cases:
    r = client.completions.create(model=adapter or "default", prompt=prompt, max_tokens=24,
                                  temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True})
    got = _ids(r.choices[0])
    ref = engine.generate([Request(prompt=prompt, adapter=adapter, max_tokens=24)])[0]
    assert got == ref.tokens, (adapter, got, ref.tokens)
    assert got == _peft_greedy(peft_model, tok(prompt)["input_ids"], adapter, 24), adapter
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert r.usage.completion_tokens == len(got)
    assert r.model == (adapter or "default")
    if adapter is not None:
      assert r.choices[0].finish_reason == "stop"
      assert r.choices[0].text == f"[{adapter}] {default.answer(adapter, words[adapter])}"
    lp = r.choices[0].logprobs
    assert np.allclose(lp.token_logprobs, ref.logprobs, atol=1e-5)
    assert all(len(top) == 1 for top in lp.top_logprobs)  # logprobs=0: the chosen token only


def test_token_id_prompts_batches_and_logprobs(world):
  """A batch of token-id prompts with n=2: choices ordered prompt by prompt; top_logprobs hold
  the k most likely tokens from the engine, in order, and the chosen one."""
  client, engine, tok = world["client"], world["engine"], world["model"].tokenizer
  prompts = [tok(default.prompt("reverse", w))["input_ids"] for w in ("abc", "hello")]
  r = client.completions.create(model="reverse", prompt=prompts, n=2, max_tokens=16,
                                temperature=0, logprobs=3)
  refs = engine.generate([Request(prompt=p, adapter="reverse", max_tokens=16) for p in prompts])
  assert [c.index for c in r.choices] == [0, 1, 2, 3]
  for c in r.choices:
    ref = refs[c.index // 2]
    assert c.text == ref.text == "[reverse] " + ("cba", "olleh")[c.index // 2]
    top = c.logprobs.top_logprobs[0]
    want = [(tok.decode([i]), lp) for i, lp in ref.top_logprobs[0][:3]]
    assert list(top)[:3] == [t for t, _ in want]
    assert [top[t] for t, _ in want] == pytest.approx([lp for _, lp in want], abs=1e-5)
    assert c.logprobs.tokens[0] in top
  assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_chat_uses_the_template_and_the_adapter(world, peft_model):
  client, tok = world["client"], world["model"].tokenizer
  messages = [{"role": "user", "content": "[upper] jaxadapt"}]
  r = client.chat.completions.create(model="upper", messages=messages, temperature=0)
  assert r.choices[0].message.content == "[upper] JAXADAPT"
  assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
  ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                return_dict=False)
  assert r.usage.prompt_tokens == len(ids)
  want = _peft_greedy(peft_model, list(ids), "upper", 64)
  assert r.usage.completion_tokens == len(want)
  assert tok.decode(want, skip_special_tokens=True) == r.choices[0].message.content
  # Content parts are joined; a role the template refuses is a 400 that says so.
  parts = [{"role": "user", "content": [{"type": "text", "text": "[upper] "},
                                         {"type": "text", "text": "jaxadapt"}]}]
  r2 = client.chat.completions.create(model="upper", messages=parts, temperature=0)
  assert r2.choices[0].message.content == "[upper] JAXADAPT"
  with pytest.raises(openai.BadRequestError, match="user and assistant messages only"):
    client.chat.completions.create(model="upper", messages=[{"role": "system",
                                                             "content": "be nice"}])


def test_streaming_equals_the_whole_answer(world):
  """SSE as OpenAI sends it: per-choice deltas that add up to the non-streamed text, a
  finish_reason per choice, usage in a last chunk without choices, then [DONE]."""
  client = world["client"]
  prompts = [default.prompt("reverse", "stream"), default.prompt("sort", "stream")]
  whole = client.completions.create(model="reverse", prompt=prompts, n=2, max_tokens=20,
                                    temperature=0)
  chunks = list(client.completions.create(model="reverse", prompt=prompts, n=2, max_tokens=20,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  text, reasons = {}, {}
  for ch in chunks[:-1]:
    assert ch.usage is None and len(ch.choices) == 1
    c = ch.choices[0]
    text[c.index] = text.get(c.index, "") + c.text
    if c.finish_reason:
      reasons[c.index] = c.finish_reason
  assert {i: c.text for i, c in enumerate(whole.choices)} == text
  assert {i: c.finish_reason for i, c in enumerate(whole.choices)} == reasons
  assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
  # Chat: the first delta names the role; the wire format is `data: {...}` lines and [DONE].
  with httpx.stream("POST", world["url"] + "/v1/chat/completions", headers=_auth(),
                    json={"model": "sort", "stream": True, "temperature": 0,
                          "messages": [{"role": "user", "content": "[sort] hello"}]}) as resp:
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line for line in resp.iter_lines() if line]
  assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
  data = [json.loads(e[6:]) for e in events[:-1]]
  assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  assert all(d["object"] == "chat.completion.chunk" for d in data)
  assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == "[sort] ehllo"
  assert data[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in data[-1]


def test_seed_stop_and_sampling(world):
  """A seed makes sampling reproducible and equal to the engine's draw with that seed (choice j
  of n draws with seed + j); a stop string ends the text before it."""
  client, engine = world["client"], world["engine"]
  prompt = "hi\n"  # two choices of 4 tokens: one prefill step for both
  kw = dict(model="default", prompt=prompt, max_tokens=12, temperature=1.0, seed=7, n=2,
            extra_body={"top_k": 20})
  a = client.completions.create(**kw)
  b = client.completions.create(**kw)
  assert [c.text for c in a.choices] == [c.text for c in b.choices]
  ref = engine.generate([Request(prompt=prompt, max_tokens=12, temperature=1.0, top_k=20,
                                 seed=s) for s in (7, 8)])
  assert [c.text for c in a.choices] == [c.text for c in ref]
  r = client.completions.create(model="reverse", prompt=default.prompt("reverse", "jaxadapt"),
                                max_tokens=24, temperature=0, stop=["a", "zz"])
  assert r.choices[0].text == "[reverse] tp" and r.choices[0].finish_reason == "stop"
  r = client.completions.create(model="reverse", prompt=default.prompt("reverse", "jaxadapt"),
                                max_tokens=5, temperature=0)
  assert r.choices[0].text == "[reve" and r.choices[0].finish_reason == "length"


def test_models_list_every_adapter_with_residency(world):
  client, engine = world["client"], world["engine"]
  client.completions.create(model="reverse", prompt=default.prompt("reverse", "x"),
                            max_tokens=4, temperature=0)
  models = {m.id: m.model_dump() for m in client.models.list()}
  assert set(models) == {"default", *TASKS, "count"}
  assert models["default"]["parent"] is None
  cfg = json.load(open(os.path.join(default.adapter_dir("count"), "adapter_config.json")))
  for name in (*TASKS, "count"):
    m = models[name]
    assert m["parent"] == "default" and m["state"] == "serving"
    assert m["rank"] == cfg["r"]
    assert set(m["targets"]) == set(cfg["target_modules"])
  assert models["reverse"]["residency"] == "device"   # served just now: pages in the pool
  assert models["count"]["residency"] == "disk"       # never requested: not even read
  assert client.models.retrieve("upper").parent == "default"
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("nope")
  assert engine.adapter_info("count")["residency"] == "disk"


def _raw(world, path, body=None, key=KEY, method="POST", headers=None, **kw):
  headers = {**({} if key is None else {"Authorization": f"Bearer {key}"}), **(headers or {})}
  return httpx.request(method, world["url"] + path, headers=headers, timeout=60,
                       **({"content": body} if isinstance(body, (str, bytes)) else
                          {"json": body} if body is not None else {}), **kw)


def _error(resp, status, match=""):
  assert resp.status_code == status, (resp.status_code, resp.text)
  err = resp.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and match in err["message"], err
  return err


def test_errors_are_openai_errors(world):
  """Unknown model 404, bad parameters 400 (with the field and what was found), bad JSON 400,
  unknown route 404: every one a JSON error body; the server serves on afterwards."""
  client = world["client"]
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="nope", prompt="x")
  assert e.value.body["code"] == "model_not_found" and "reverse" in e.value.body["message"]
  p = default.prompt("reverse", "abc")
  bad = [({"temperature": -1}, "temperature", "greater than or equal to 0"),
         ({"top_p": 0}, "top_p", "greater than 0"),
         ({"n": 0}, "n", "greater than or equal to 1"),
         ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
         ({"max_tokens": 10 ** 6}, "max_tokens", "context of 256 tokens"),
         ({"max_tokens": "5"}, "max_tokens", "valid integer"),
         ({"prompt": []}, "prompt", "must not be empty"),
         ({"prompt": [100000]}, "prompt", "outside the vocabulary"),
         ({"stop": [""]}, "stop", "non-empty"),
         ({"logprobs": 9}, "logprobs", "less than or equal to 5"),
         ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
         ({"n": 100, "prompt": [p, p]}, "n", "at most 128")]
  for extra, param, match in bad:
    err = _error(_raw(world, "/v1/completions", {"model": "reverse", "prompt": p, **extra}),
                 400, match)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
  _error(_raw(world, "/v1/completions", '{"model": "reverse", "prompt": "x", "temperature": '
                                        'NaN}', headers={"content-type": "application/json"}),
         400, "finite number")
  _error(_raw(world, "/v1/completions", "{not json", headers={"content-type":
                                                              "application/json"}), 400)
  _error(_raw(world, "/v1/completions", "[1, 2]"), 400, "object")
  _error(_raw(world, "/v1/chat/completions", {"model": "reverse", "messages": []}), 400,
         "at least 1")
  _error(_raw(world, "/v1/nothing", {}), 404, "no route")
  _error(_raw(world, "/v1/completions", method="GET"), 405)
  assert client.completions.create(model="reverse", prompt=p, max_tokens=16,
                                   temperature=0).choices[0].text == "[reverse] cba"


def test_api_key_on_every_route_but_health(world):
  routes = [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
            ("POST", "/v1/unload_lora_adapter"), ("GET", "/openapi.json"), ("GET", "/nope")]
  for key in (None, "wrong"):
    for method, path in routes:
      err = _error(_raw(world, path, {}, key=key, method=method), 401, "API key")
      assert err["code"] == "invalid_api_key"
  assert _raw(world, "/health", key=None, method="GET").json() == {"status": "ok"}
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=world["url"] + "/v1", api_key="wrong",
                  max_retries=0).models.list()


def _load(world, name, path):
  return _raw(world, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def test_load_confined_to_the_allowed_dirs(world):
  """Load requests are checked before anything changes: outside the allowed dirs (.., a
  symlink out, an absolute path elsewhere) 403; not a PEFT dir 404; an adapter for another
  base 422 with the reason; nothing of these registered."""
  engine, allowed, outside = world["engine"], world["allowed"], world["outside"]
  before = engine.store.names()
  for path in ("../outside/up2", str(allowed / ".." / "outside" / "up2"), "escape",
               str(allowed / "escape"), str(outside / "up2"), "/etc"):
    err = _error(_load(world, "sneaky", path), 403)
    assert err["param"] == "lora_path" and err["code"] == "adapter_path_not_allowed", err
  _error(_load(world, "sneaky", "missing"), 404, "not a PEFT adapter dir")
  err = _error(_load(world, "foreign", "foreign"), 422, "does not fit the base")
  assert err["code"] == "adapter_incompatible"
  _error(_load(world, "reverse", "rev2"), 400, "already been loaded")
  _error(_load(world, "default", "rev2"), 400, "base model's name")
  _error(_raw(world, "/v1/load_lora_adapter", {"lora_name": "x"}), 400, "lora_path")
  assert engine.store.names() == before


def test_load_and_unload_while_generating(world, slow_steps):
  """A loaded copy of `reverse` answers as `reverse`; unloading it while a long stream runs
  lets that stream finish, refuses new requests at once (404) and then forgets the name."""
  client, engine = world["client"], world["engine"]
  resp = _load(world, "rev2", "rev2")
  assert resp.status_code == 200 and "rev2" in resp.text
  assert client.models.retrieve("rev2").parent == "default"
  p = default.prompt("reverse", "loaded")
  assert client.completions.create(model="rev2", prompt=p, max_tokens=20,
                                   temperature=0).choices[0].text == "[reverse] dedaol"
  out, started = {}, threading.Event()

  def long_stream():
    text, reason = "", None
    for ch in client.completions.create(model="rev2", prompt=p, max_tokens=40, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True}):
      started.set()
      text += ch.choices[0].text
      reason = ch.choices[0].finish_reason or reason
    out.update(text=text, reason=reason)

  t = threading.Thread(target=long_stream)
  t.start()
  assert started.wait(60)
  assert _raw(world, "/v1/unload_lora_adapter", {"lora_name": "rev2"}).status_code == 200
  with pytest.raises(openai.NotFoundError, match="being unloaded"):
    client.completions.create(model="rev2", prompt=p, max_tokens=4)
  _error(_raw(world, "/v1/unload_lora_adapter", {"lora_name": "rev2"}), 404)
  t.join(120)
  assert out["reason"] == "length" and out["text"].startswith("[reverse] dedaol")
  deadline = time.monotonic() + 10
  while "rev2" in engine.store and time.monotonic() < deadline:
    time.sleep(0.05)
  assert "rev2" not in engine.store
  assert "rev2" not in {m.id for m in client.models.list()}
  _error(_raw(world, "/v1/unload_lora_adapter", {"lora_name": "nope"}), 404, "cannot be found")


def _metrics(world):
  from prometheus_client.parser import text_string_to_metric_families
  resp = _raw(world, "/metrics", method="GET")
  assert resp.status_code == 200
  return {f.name: f for f in text_string_to_metric_families(resp.text)}


def test_metrics_carry_the_gateway_protocol(world, slow_steps):
  """While 8 long `upper` requests fill the batch (max_seqs=8) and a `sort` request waits,
  lora_requests_info names `upper` running and `sort` waiting; the queue and running gauges
  agree; afterwards the request counters and latency histograms count what was served."""
  client = world["client"]
  before = _metrics(world)
  done_before = sum(s.value for s in before["vllm:request_success"].samples
                    if s.name.endswith("_total"))
  threads, outs = [], []

  def run(model, words):
    r = client.completions.create(model=model, prompt=default.prompt(model, words),
                                  max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    outs.append(r.choices[0].finish_reason)

  for i in range(8):
    threads.append(threading.Thread(target=run, args=("upper", f"word{i}")))
  threads.append(threading.Thread(target=run, args=("sort", "last")))
  for t in threads:
    t.start()
    time.sleep(0.02)
  seen = None
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    m = _metrics(world)
    info = m["vllm:lora_requests_info"].samples[0].labels
    if m["vllm:num_requests_running"].samples[0].value == 8 and \
        info["waiting_lora_adapters"] == "sort":
      seen = m
      break
    time.sleep(0.05)
  assert seen is not None, "never saw 8 running and sort waiting"
  info = seen["vllm:lora_requests_info"].samples[0]
  assert info.labels["running_lora_adapters"] == "upper" and info.labels["max_lora"] == "64"
  assert info.value == pytest.approx(time.time(), abs=60)
  assert seen["vllm:num_requests_waiting"].samples[0].value == 1
  assert 0 < seen["vllm:kv_cache_usage_perc"].samples[0].value <= 1
  for t in threads:
    t.join(120)
  assert outs == ["length"] * 9
  after = _metrics(world)
  done_after = sum(s.value for s in after["vllm:request_success"].samples
                   if s.name.endswith("_total"))
  assert done_after - done_before == 9
  e2e = {s.name: s.value for s in after["vllm:e2e_request_latency_seconds"].samples}
  assert e2e["vllm:e2e_request_latency_seconds_count"] >= 9
  st = world["engine"].stats()
  assert after["jaxadapt_engine_adapter_loads"].samples[0].value == st["adapter_loads"]
  assert after["vllm:num_requests_running"].samples[0].value == 0


def test_client_disconnect_cancels_the_request(world, slow_steps):
  engine = world["engine"]
  before = engine.stats().get("finished_cancelled", 0)
  with httpx.stream("POST", world["url"] + "/v1/completions", headers=_auth(), timeout=60,
                    json={"model": "upper", "prompt": default.prompt("upper", "bye"),
                          "max_tokens": 48, "temperature": 0, "stream": True,
                          "ignore_eos": True}) as resp:
    lines = resp.iter_lines()
    assert next(lines).startswith("data: ")
  deadline = time.monotonic() + 30
  while engine.stats().get("finished_cancelled", 0) == before and time.monotonic() < deadline:
    time.sleep(0.05)
  st = engine.stats()
  assert st.get("finished_cancelled", 0) == before + 1
  assert st["running"] == 0


def test_overload_and_shutdown_answer_429_and_503(world):
  """A full queue is a 429 with Retry-After; a closing engine a 503 (no engine steps here)."""
  from fastapi.testclient import TestClient
  engine = Engine(world["model"], adapters={"reverse": "default:reverse"}, pool_mb=4,
                  max_queue=0, prefetch=False)
  app = api.make_app(engine, model_name="default", start_engine=False)
  with TestClient(app) as http:
    body = {"model": "default", "prompt": "x", "max_tokens": 2}
    resp = http.post("/v1/completions", json=body)
    _error(resp, 429, "max_queue")
    assert resp.headers["retry-after"] == "1"
    engine.close()
    _error(http.post("/v1/completions", json=body), 503, "shutting down")


def test_echo_and_chat_logprobs(world):
  client, engine = world["client"], world["engine"]
  prompt = default.prompt("reverse", "abc")
  r = client.completions.create(model="reverse", prompt=prompt, max_tokens=16, temperature=0,
                                echo=True)
  assert r.choices[0].text == prompt + "[reverse] cba"
  messages = [{"role": "user", "content": "[upper] abc"}]
  r = client.chat.completions.create(model="upper", messages=messages, temperature=0,
                                     logprobs=True, top_logprobs=2)
  ref = engine.generate([Request(prompt=world["model"].tokenizer.apply_chat_template(
      messages, tokenize=True, add_generation_prompt=True, return_dict=False), adapter="upper",
      max_tokens=64)])[0]
  content = r.choices[0].logprobs.content
  assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-5)
  assert all(len(c.top_logprobs) == 2 for c in content)
  assert "".join(c.token for c in content[:-1]) == r.choices[0].message.content  # then eos


def test_models_without_a_tokenizer_or_a_chat_template(world, llama_dir, tmp_path):
  """Text prompts need a tokenizer and chat needs a template: each a 400 that says which is
  missing; `chat_template=` (--chat-template) supplies one (the request then reaches the
  engine's queue, full here: 429)."""
  from fastapi.testclient import TestClient
  chat = {"messages": [{"role": "user", "content": "[upper] abc"}]}
  bare = Engine(ja.load_model(llama_dir[0]), pool_mb=2, prefetch=False, max_queue=0)
  with TestClient(api.make_app(bare, model_name="bare", start_engine=False)) as http:
    _error(http.post("/v1/chat/completions", json=chat), 400, "no tokenizer")
    _error(http.post("/v1/completions", json={"prompt": "hi"}), 400, "tokenizer")
    _error(http.post("/v1/completions", json={"prompt": [1, 2], "stop": ["x"]}), 400,
           "tokenizer")
    _error(http.post("/v1/completions", json={"prompt": [1, 2]}), 429, "max_queue")
  plain = tmp_path / "plain"
  shutil.copytree(default.model_dir(), plain)
  cfg = json.load(open(plain / "tokenizer_config.json"))
  template = cfg.pop("chat_template")
  json.dump(cfg, open(plain / "tokenizer_config.json", "w"))
  model = ja.load_model(str(plain))
  engine = Engine(model, pool_mb=2, prefetch=False, max_queue=0)
  with TestClient(api.make_app(engine, start_engine=False)) as http:
    _error(http.post("/v1/chat/completions", json=chat), 400, "no chat template")
  engine = Engine(model, pool_mb=2, prefetch=False, max_queue=0)  # the app closed the first
  with TestClient(api.make_app(engine, start_engine=False, chat_template=template)) as http:
    _error(http.post("/v1/chat/completions", json=chat), 429, "max_queue")


def test_a_lazily_registered_adapter_that_does_not_fit_is_a_422(world):
  """An adapter registered without being read (as --adapter-dir does) and made for another
  base: the request is refused with the reason before anything is queued."""
  engine = world["engine"]
  engine.store.register("lazy-foreign", str(world["allowed"] / "foreign"))
  try:
    err = _error(_raw(world, "/v1/completions", {"model": "lazy-foreign", "prompt": "x"}), 422,
                 "does not fit the base")
    assert err["code"] == "adapter_incompatible" and err["param"] == "model"
    assert engine.stats()["waiting"] == 0
  finally:
    engine.store.unregister("lazy-foreign")
