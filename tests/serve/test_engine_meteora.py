"""A MeteoRA model served by the S-LoRA engine (MeteoRA Eq. 3-4 in the same batched forward as
plain adapter requests): its tokens equal `Meteora.generate`'s, plain-adapter and base requests
in the same batches equal `model.generate`'s, its adapters stay pinned in the pool, and what the
engine cannot serve is refused by name."""
import pytest

import jaxadapt as ja
from serve.engine import Engine, Request

NEW = 12


@pytest.fixture(scope="module")
def world():
  model = ja.load_model("default")
  m = ja.load_meteora("default", model)
  engine = Engine(model, adapters={"reverse": ja.default.adapter_dir("reverse"),
                                   "upper": ja.default.adapter_dir("upper")},
                  meteora=m, max_seqs=8)
  return model, m, engine


def _prompts():
  return [ja.default.prompt(("reverse", "planet"), ("upper", "sky")),
          ja.default.prompt("count", "abcde"), ja.default.prompt("reverse", "hello"),
          ja.default.prompt("upper", "river"), ja.default.prompt("max", "3817")]


def test_meteora_requests_beside_plain_ones_equal_generate(world):
  model, m, engine = world
  p = _prompts()
  names = ["meteora", "meteora", "reverse", None, "meteora"]
  out = engine.generate([Request(prompt=q, adapter=n, max_tokens=NEW, eos_token_id=[])
                         for q, n in zip(p, names)])
  for q, n, c in zip(p, names, out):
    if n == "meteora":
      want = m.generate(q, max_new_tokens=NEW, eos_token_id=[]).ids[0]
    else:
      adapter = ja.load_adapter(ja.default.adapter_dir(n)) if n else None
      want = model.generate(q, max_new_tokens=NEW, eos_token_id=[], adapter=adapter).ids[0]
    assert c.tokens == want, (n, q)
  # The gates route differently from every single adapter: the MeteoRA rows are not a copy.
  alone = model.generate(p[1], max_new_tokens=NEW, eos_token_id=[],
                         adapter=ja.load_adapter("default:count")).ids[0]
  assert out[1].tokens != alone or out[0].tokens != model.generate(
      p[0], max_new_tokens=NEW, eos_token_id=[], adapter=ja.load_adapter("default:reverse")).ids[0]
  info = engine.adapter_info("meteora")
  assert info["residency"] == "device" and info["adapters"] == list(ja.default.TASKS)
  pinned = [k for k in engine.pool.resident if k[0].startswith("meteora/")]
  assert len(pinned) == 8 and all(engine.pool.resident[k].users >= 1 for k in pinned)


def test_what_cannot_be_served_is_refused(world):
  model, m, engine = world
  with pytest.raises(ValueError, match="without tensor parallelism"):
    Engine(model, meteora=m, tensor_parallel=2)
  with pytest.raises(ValueError, match="is also an adapter's"):
    Engine(model, adapters={"meteora": ja.default.adapter_dir("upper")}, meteora=m)
  with pytest.raises(ValueError, match=r"need 640 pool pages, 199 are free; a larger pool"):
    Engine(model, meteora=m, num_pages=200)
  from serve.store import UnknownAdapter
  with pytest.raises(UnknownAdapter, match="unknown adapter 'meteora2'"):
    engine.submit(Request(prompt="x", adapter="meteora2", max_tokens=2))


def test_the_server_serves_it_as_model_meteora(world):
  """`jaxadapt serve --meteora DIR`'s path: the OpenAI client asks for model "meteora" and gets
  the MeteoRA model's greedy text; /v1/models lists it with its adapters."""
  import openai
  from serve import api
  model, m, engine = world
  engine.start()
  server = api.BackgroundServer(api.make_app(engine, model_name="default"))
  try:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    prompt = ja.default.prompt(("sort", "banana"), ("upper", "kiwi"))
    got = client.completions.create(model="meteora", prompt=prompt, max_tokens=NEW,
                                    temperature=0.0)
    want = m.generate(prompt, max_new_tokens=NEW).text[0]
    assert got.choices[0].text == want
    cards = {c.id: c for c in client.models.list().data}
    assert cards["meteora"].kind == "meteora" and cards["meteora"].adapters == list(
        ja.default.TASKS)
    assert cards["meteora"].residency == "device" and "reverse" in cards
  finally:
    server.stop()
  parsed = api._parser().parse_args(["--meteora", "default"])  # pylint: disable=protected-access
  assert parsed.meteora == "default"
