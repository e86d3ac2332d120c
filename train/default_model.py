"""Rebuilds the embedded default model: a byte-level Llama and its task LoRAs, from scratch.

  python -m train.default_model                 # every file of jaxadapt/default/ + the docs page
  python -m train.default_model --out DIR       # the files into DIR, report DIR/default_model.md
  python -m train.default_model --quick --out DIR   # a tiny run (seconds): the pipeline only
  python -m train.default_model --base_steps 500 --work_dir runs/dm ...   (any config field)

Three stages, each through the one trainer (`train.loop.Trainer`), with progress bars:
  1. pre-train the base, every parameter, on stdlib-docstring prose and the prompt format with
     four base skills that are none of the tasks (`train.tasks.BASE_SKILLS`);
  2. train one LoRA per task (`jaxadapt.default.TASKS`) on the frozen base, its loss on its own
     answer segments only, some examples holding other tasks' segments as context;
  3. export (a Hugging Face dir with a byte-level tokenizer, chat template and generation config;
     PEFT adapter dirs) and evaluate the exported files: greedy exact match on each task's
     held-out set, with the adapter and with the base alone, written as a table to
     `docs/default_model.md` with the command, the time and the settings.

The run's checkpoints go to `--work_dir` (default: a temporary dir, removed at the end); with a
`--work_dir`, a killed run continues where it stopped. The total time is printed at the end.

References:
  LLaMA (Touvron et al., 2023); LoRA (Hu et al., 2021); AdamW (Loshchilov & Hutter, 2019).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import default as default_lib
from jaxadapt import sharding as sharding_lib
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.causal_lm import CausalLM, load_model
from jaxadapt.io.peft import load_adapter, save_adapter
from jaxadapt.models.llama import LlamaConfig
from train import flags
from train import lm
from train import loop
from train import pretrain
from train import tasks as tasks_lib
from train.loop import RunError

PACKAGE_DIR = os.path.dirname(os.path.abspath(default_lib.__file__))  # jaxadapt/default
REPO_DOCS = os.path.join(os.path.dirname(os.path.dirname(PACKAGE_DIR)), "docs",
                         "default_model.md")
# Every linear layer of the decoder (PEFT's "all-linear"; the tied lm_head cannot take a LoRA).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('the default model knows user and assistant messages only, "
    "got ' + message['role']) }}{% endif %}{% endfor %}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DefaultModelConfig:
  """Everything a rebuild depends on; `train/configs/default_model*.py` return one."""
  name: str = "default"                 # the embedded name it ships as ("default-v2": the
                                        # successor, written to jaxadapt/default/v2)
  out: str = PACKAGE_DIR                # model/ and adapters/<task>/ are written here
  work_dir: Optional[str] = None        # checkpoints + metrics; None = a temporary dir
  report: Optional[str] = None          # the results page; None = docs/default_model.md when
                                        # out is the package dir, else OUT/default_model.md
  tasks: tuple = default_lib.TASKS      # the task adapters to train
  # The base's architecture (a Llama with grouped-query attention and tied embeddings).
  hidden_size: int = 128                # width of the residual stream
  intermediate_size: int = 384          # width of the MLP
  num_hidden_layers: int = 4            # decoder layers
  num_attention_heads: int = 4          # query heads
  num_key_value_heads: int = 2          # key/value heads (< heads: GQA)
  head_dim: int = 32                    # width of a head
  max_position_embeddings: int = 256    # longest sequence (prompt + answer)
  # Base pre-training (every parameter).
  base_steps: int = 1200                # optimizer steps
  base_batch: int = 32                  # rows per batch
  seq_len: int = 96                     # tokens per row (whole examples packed, or prose)
  base_lr: float = 3e-3                 # peak learning rate (after warmup)
  base_warmup: int = 100                # linear warmup steps
  weight_decay: float = 0.1             # AdamW decay on matrices
  prose_fraction: float = 0.2           # rows of prose (the rest: base-skill examples)
  base_multi_fraction: float = 0.3      # base-skill examples with 2-3 segments
  # Task LoRAs (the base frozen).
  lora_steps: int = 120                 # optimizer steps per task (unless lora_task_steps)
  # Per-task steps ("task=steps" items; the others take lora_steps): the harder tasks get more.
  lora_task_steps: tuple = ("reverse=250", "sort=450", "upper=100", "max=150", "dedupe=900")
  lora_batch: int = 32                  # rows per batch
  lora_lr: float = 5e-3                 # peak learning rate (after warmup)
  lora_warmup: int = 20                 # linear warmup steps
  lora_r: int = 16                      # LoRA rank on every linear layer of the decoder
  lora_alpha: float = 32.0              # LoRA alpha (scale = alpha / r)
  lora_multi_fraction: float = 0.3      # examples that hold other tasks' segments as context
  # Evaluation and the rest.
  eval_examples: int = 256              # held-out examples per task
  seed: int = 0                         # init and data order
  progress: bool = True                 # tqdm progress bars

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "lora_task_steps", tuple(self.lora_task_steps))
    loop.check_numbers(
        self, positive_ints=("hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "head_dim",
                             "max_position_embeddings", "base_steps", "base_batch", "seq_len",
                             "lora_steps", "lora_batch", "lora_r", "eval_examples"),
        ints=("base_warmup", "lora_warmup", "seed"),
        finite=("base_lr", "weight_decay", "prose_fraction", "base_multi_fraction", "lora_lr",
                "lora_alpha", "lora_multi_fraction"))
    if self.name not in default_lib.VERSIONS:
      raise ValueError(f"name must be one of {tuple(default_lib.VERSIONS)}, got {self.name!r}")
    unknown = [t for t in self.tasks if t not in default_lib.TASKS]
    if unknown or not self.tasks:
      raise ValueError(f"tasks must be some of {default_lib.TASKS}; got {self.tasks}")
    for name in ("prose_fraction", "base_multi_fraction", "lora_multi_fraction"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.seq_len > self.max_position_embeddings:
      raise ValueError(f"seq_len={self.seq_len} > max_position_embeddings="
                       f"{self.max_position_embeddings}")
    if self.seq_len < 64:
      raise ValueError(f"seq_len must be >= 64: a one-task example takes up to ~50 tokens and "
                       f"examples that do not fit a row are never drawn; got {self.seq_len}")
    base_optimizer(self)
    for task in self.tasks:
      lora_optimizer(self, task)
    self.model_config()

  def model_config(self) -> LlamaConfig:
    return LlamaConfig(
        model_type="llama", vocab_size=tasks_lib.VOCAB_SIZE, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
        max_position_embeddings=self.max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=True)

  def lora_config(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha,
                               target_modules=LORA_TARGETS)

  def lora_steps_of(self, task: str) -> int:
    """The optimizer steps of `task`'s adapter (`lora_task_steps`, else `lora_steps`)."""
    return task_steps(self.lora_task_steps, task, self.lora_steps)

  def report_path(self) -> str:
    if self.report is not None:
      return self.report
    same = os.path.realpath(self.out) == os.path.realpath(PACKAGE_DIR)
    return REPO_DOCS if same else os.path.join(self.out, "default_model.md")

  def to_record(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def task_steps(items: Sequence[str], task: str, default: int) -> int:
  """The steps that `"task=steps"` items give `task` (else `default`).

  Raises:
    ValueError: an item that is not `task=steps` with a task of `jaxadapt.default.TASKS` and
      steps >= 1.
  """
  steps = {}
  for item in items:
    name, _, value = str(item).partition("=")
    if name not in default_lib.TASKS or not value.isdigit() or int(value) < 1:
      raise ValueError(f"lora_task_steps items are 'task=steps' with a task of "
                       f"{default_lib.TASKS} and steps >= 1; got {item!r}")
    steps[name] = int(value)
  return steps.get(task, default)


def base_optimizer(config: DefaultModelConfig) -> loop.AdamW:
  return loop.AdamW(learning_rate=config.base_lr, steps=config.base_steps,
                    warmup_steps=min(config.base_warmup, config.base_steps),
                    weight_decay=config.weight_decay, decay_mask=loop.decay_matrices)


def lora_optimizer(config: DefaultModelConfig, task: str) -> loop.AdamW:
  steps = config.lora_steps_of(task)
  return loop.AdamW(learning_rate=config.lora_lr, steps=steps,
                    warmup_steps=min(config.lora_warmup, steps))


# Fields that do not change what a stage trains (a resume may change them).
_NOT_TRAINING = ("name", "out", "work_dir", "report", "tasks", "eval_examples", "progress")


def _stage_record(config: DefaultModelConfig, stage: str) -> dict:
  record = {k: v for k, v in config.to_record().items() if k not in _NOT_TRAINING}
  if stage == "base":
    record = {k: v for k, v in record.items() if not k.startswith("lora_")}
  else:  # a task's adapter: its own steps only
    for k in ("lora_steps", "lora_task_steps"):
      record.pop(k)
    record["lora_steps"] = config.lora_steps_of(stage)
  return {"config": record, "stage": stage}


# --- stage 1: the base ---------------------------------------------------------------------------

def train_base(config: DefaultModelConfig, work_dir: str, mesh) -> CausalLM:
  """Pre-trains the base (every parameter) on prose and the base skills; see the module doc."""
  model = CausalLM.random(config.model_config(), seed=config.seed)
  params = sharding_lib.shard_params(model.params, mesh)
  tx = base_optimizer(config)

  def batches(position):
    return tasks_lib.base_batch(position, config.base_batch, config.seq_len, seed=config.seed,
                                prose_fraction=config.prose_fraction,
                                multi_fraction=config.base_multi_fraction)

  with loop.Trainer(os.path.join(work_dir, "base"), steps=config.base_steps,
                    checkpoint_every=max(config.base_steps // 4, 1), keep_checkpoints=1,
                    progress=config.progress, desc="base") as trainer:
    fit = trainer.fit(lm.NextTokenLoss(model.graphdef), tx, params, {}, batches, mesh=mesh,
                      batch_size=config.base_batch, seed=config.seed,
                      record=_stage_record(config, "base"), learning_rate=tx.schedule)
  return CausalLM(model.config, model.graphdef, fit.trainable)


# --- stage 2: the task adapters -------------------------------------------------------------------

def train_adapter(config: DefaultModelConfig, base: CausalLM, task: str, work_dir: str,
                  mesh) -> lora_lib.LoraAdapter:
  """Trains `task`'s LoRA on the frozen `base`: its loss on its own answer segments only."""
  lora_config = config.lora_config()
  key = jax.random.fold_in(jax.random.key(config.seed), default_lib.TASKS.index(task))
  weights = lora_lib.init_lora(base.params, base.linear_paths, lora_config, key).weights
  weights = sharding_lib.shard_adapter_weights(weights, mesh)
  tx = lora_optimizer(config, task)

  def batches(position):
    return tasks_lib.task_batch(task, position, config.lora_batch, config.seq_len,
                                seed=config.seed, multi_fraction=config.lora_multi_fraction)

  steps = config.lora_steps_of(task)
  with loop.Trainer(os.path.join(work_dir, "lora", task), steps=steps,
                    checkpoint_every=steps, keep_checkpoints=1,
                    progress=config.progress, desc=f"lora {task}") as trainer:
    fit = trainer.fit(lm.NextTokenLoss(base.graphdef, lora=lora_config), tx, weights,
                      base.params, batches, mesh=mesh, batch_size=config.lora_batch,
                      seed=config.seed, record=_stage_record(config, task),
                      learning_rate=tx.schedule)
  return lora_lib.LoraAdapter(weights=fit.trainable, config=lora_config)


# --- evaluation -----------------------------------------------------------------------------------

def teacher_forced_exact_match(model: CausalLM, adapter, examples, *,
                               task: Optional[str] = None, batch_rows: int = 256) -> np.ndarray:
  """Per example: does the argmax under teacher forcing equal the answer at every answer
  position (eos included)? For the whole answer that is greedy decoding's exact match, computed
  in one forward.

  Args:
    model, adapter: the model and the adapter (None: the base alone).
    examples: lists of segments, one example per row (at position 0, as in generation).
    task: score only this task's answer segments (the others are given as context); None: the
      whole answer.

  Returns:
    [len(examples)] bool.
  """
  out = []
  for i in range(0, len(examples), batch_rows):
    batch = tasks_lib.eval_batch(examples[i:i + batch_rows], task=task)
    logits = model(batch["input_ids"], batch["attention_mask"], adapter=adapter)
    pred = np.asarray(jnp.argmax(logits[:, :-1], axis=-1))
    target = batch["labels"][:, 1:]
    out.append(((pred == target) | (target == tasks_lib.IGNORE)).all(axis=1))
  return np.concatenate(out)


def answer_of(ids) -> str:
  """The answer text of generated byte ids: up to eos, or the text + " <no eos>" (so it never
  equals a right answer) when the row did not end."""
  ids = [int(t) for t in ids]
  ended = bool(ids) and ids[-1] == tasks_lib.EOS_ID
  text = bytes(t for t in (ids[:-1] if ended else ids) if t < 256).decode("utf-8", "replace")
  return text if ended else text + " <no eos>"


def generated_answers(model: CausalLM, adapter, segments_list, *, batch_rows: int = 256,
                      context=None) -> list[str]:
  """The greedy answers (`model.generate`, stopped by eos) to the prompts of `segments_list`,
  with `adapter` (None: the base) or a forward `context` (e.g. a MeteoRA model's routers)."""
  texts = []
  longest = max(len(tasks_lib.answer_text(s)) for s in segments_list) + 8
  for i in range(0, len(segments_list), batch_rows):
    prompts = [[tasks_lib.BOS_ID, *tasks_lib.prompt_text(s).encode()]
               for s in segments_list[i:i + batch_rows]]
    out = model.generate(prompts, max_new_tokens=longest, adapter=adapter, context=context,
                         eos_token_id=tasks_lib.EOS_ID)
    texts += [answer_of(ids) for ids in out.ids]  # eos last: finish reason "stop"
  return texts


def composed_segments(task: str, n: int) -> list[list[tasks_lib.Segment]]:
  """`n` two-task examples: `task`'s held-out input beside another task's held-out input (in
  either order, fixed)."""
  rng = np.random.default_rng([tasks_lib.HELDOUT_SEED, 7, default_lib.TASKS.index(task)])
  others = [t for t in default_lib.TASKS if t != task]
  out = []
  for seg in tasks_lib.heldout_segments(task, n):
    other = others[int(rng.integers(0, len(others)))]
    pool = tasks_lib.heldout_inputs(other, n)
    pair = [seg, tasks_lib.Segment(other, pool[int(rng.integers(0, len(pool)))])]
    out.append(pair if rng.random() < 0.5 else pair[::-1])
  return out


def evaluate(model: CausalLM, adapters: dict, config: DefaultModelConfig) -> dict:
  """Greedy exact match per task on its held-out set, with its adapter and with the base alone;
  and the adapter's own-segment exact match in two-task prompts (teacher forced).

  Returns:
    {task: {"adapter": fraction, "base": fraction, "composed": fraction, "n": examples,
    "examples": [(prompt, adapter's answer, base's answer)] * 3}}.
  """
  from tqdm.auto import tqdm
  results = {}
  for task in tqdm(config.tasks, desc="evaluate", disable=not config.progress):
    segs = [[s] for s in tasks_lib.heldout_segments(task, config.eval_examples)]
    want = [tasks_lib.answer_text(s) for s in segs]
    got = {name: generated_answers(model, a, segs)
           for name, a in (("adapter", adapters[task]), ("base", None))}
    results[task] = {
        "n": len(segs),
        **{name: float(np.mean([g == w for g, w in zip(answers, want)]))
           for name, answers in got.items()},
        "composed": float(teacher_forced_exact_match(
            model, adapters[task], composed_segments(task, config.eval_examples),
            task=task).mean()),
        "examples": [(tasks_lib.prompt_text(s).rstrip("\n"), got["adapter"][i], got["base"][i])
                     for i, s in enumerate(segs[:3])],
    }
  return results


# --- export ---------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the `tokenizers` ByteLevel alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def save_tokenizer(directory: str, max_length: int):
  """Writes the byte-level tokenizer: token id = byte value (0..255), then <pad>, <bos>, <eos>.

  `tokenizer.json` (a `tokenizers` BPE with no merges over the ByteLevel alphabet, so every
  byte is one token; bos prepended by the post-processor) and `tokenizer_config.json` (the
  special tokens and the chat template) load with `AutoTokenizer.from_pretrained(dir)`.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  table = _bytes_to_unicode()
  tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(tasks_lib.SPECIAL_TOKENS))
  if [tok.token_to_id(t) for t in tasks_lib.SPECIAL_TOKENS] != list(
      tasks_lib.SPECIAL_TOKENS.values()):
    raise AssertionError("the special tokens did not get the ids train.tasks gives them")
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tasks_lib.BOS_ID)])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
            "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True,
            "add_eos_token": False, "model_max_length": max_length, "padding_side": "left",
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f, indent=2)


def save_model(model: CausalLM, directory: str):
  """The base as a Hugging Face dir: config.json (LlamaForCausalLM, with the special token ids),
  model.safetensors (float32), the tokenizer and generation_config.json."""
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  pretrain.save_hf_model(model, directory)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  ids = {"bos_token_id": tasks_lib.BOS_ID, "eos_token_id": tasks_lib.EOS_ID,
         "pad_token_id": tasks_lib.PAD_ID}
  cfg.update(ids)
  with open(path, "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({**ids, "do_sample": False, "max_new_tokens": 64}, f, indent=2)
  save_tokenizer(directory, model.config.max_position_embeddings)


def shipped_bytes(directory: str) -> int:
  """Bytes of the files under `directory`'s model/ and adapters/."""
  total = 0
  for sub in ("model", "adapters"):
    for root, _, files in os.walk(os.path.join(directory, sub)):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


# --- the whole rebuild ----------------------------------------------------------------------------

@dataclasses.dataclass
class BuildResult:
  """What `build` returns."""
  results: dict          # evaluate()'s table
  seconds: dict          # wall time of each stage and in all (and the load average at the
                         # start and the end)
  bytes: int             # size of the shipped files
  report: str            # where the results page was written


def build(config: DefaultModelConfig, *, command: str = "python -m train.default_model"
          ) -> BuildResult:
  """Runs the three stages (see the module docstring) and writes the files and the report."""
  t0 = time.time()
  seconds = {"load_start": os.getloadavg()[0]}
  mesh = sharding_lib.make_mesh(1, 1)
  work_dir = config.work_dir or tempfile.mkdtemp(prefix="default_model_")
  try:
    base = train_base(config, work_dir, mesh)
    seconds["base"] = time.time() - t0
    t1 = time.time()
    for task in config.tasks:
      save_adapter(jax.device_get(train_adapter(config, base, task, work_dir, mesh)),
                   os.path.join(config.out, "adapters", task))
    seconds["adapters"] = time.time() - t1
  finally:
    if config.work_dir is None:
      shutil.rmtree(work_dir, ignore_errors=True)
  save_model(base, os.path.join(config.out, "model"))
  t2 = time.time()
  # Evaluate the exported files, as users load them.
  model = load_model(os.path.join(config.out, "model"))
  adapters = {t: load_adapter(os.path.join(config.out, "adapters", t)) for t in config.tasks}
  results = evaluate(model, adapters, config)
  seconds["eval"] = time.time() - t2
  seconds["total"] = time.time() - t0
  seconds["load_end"] = os.getloadavg()[0]
  size = shipped_bytes(config.out)
  report = config.report_path()
  n_params = sum(int(x.size) for x in jax.tree.leaves(model.params))
  write_report(report, config, results, seconds, size, n_params, command)
  return BuildResult(results=results, seconds=seconds, bytes=size, report=report)


def _minutes(s: float) -> str:
  return f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def results_table(results: dict) -> str:
  """The per-task accuracy table (markdown)."""
  lines = ["| task | what it does | adapter | base alone | in 2-task prompts | held-out | "
           "example (adapter's answer) |", "|---|---|---|---|---|---|---|"]
  for task, r in results.items():
    prompt, answer, _ = r["examples"][0]
    lines.append(f"| `{task}` | {default_lib.DESCRIPTIONS[task]} | {100 * r['adapter']:.1f}% | "
                 f"{100 * r['base']:.1f}% | {100 * r['composed']:.1f}% | {r['n']} | "
                 f"`{prompt}` → `{answer}` |")
  return "\n".join(lines)


def write_report(path: str, config: DefaultModelConfig, results: dict, seconds: dict,
                 size: int, n_params: int, command: str):
  """Writes the results page (docs/default_model.md for the shipped build)."""
  c = config
  title = ("The embedded default model" if c.name == "default" else
           f"The embedded model {c.name!r}: the default's successor")
  text = REPORT.format(
      title=title, name=c.name, command=command,
      where="jaxadapt/default/" if c.name == "default" else "jaxadapt/default/v2/", total=_minutes(seconds["total"]), base_time=_minutes(seconds["base"]),
      adapters_time=_minutes(seconds["adapters"]), eval_time=_minutes(seconds["eval"]),
      n_tasks=len(c.tasks), machine=f"{os.cpu_count()} CPU cores ({platform.machine()})",
      load_start=seconds["load_start"], load_end=seconds["load_end"],
      python=platform.python_version(), jax=jax.__version__, table=results_table(results),
      size_mb=size / 1e6, hidden=c.hidden_size, inter=c.intermediate_size,
      layers=c.num_hidden_layers, heads=c.num_attention_heads, kv=c.num_key_value_heads,
      head_dim=c.head_dim, max_pos=c.max_position_embeddings, vocab=tasks_lib.VOCAB_SIZE,
      params_m=n_params / 1e6, base_steps=c.base_steps, base_batch=c.base_batch,
      seq_len=c.seq_len, base_lr=c.base_lr, prose_pct=round(100 * c.prose_fraction),
      multi_pct=round(100 * c.base_multi_fraction),
      lora_steps=", ".join(f"{t} {c.lora_steps_of(t)}" for t in c.tasks),
      lora_batch=c.lora_batch, lora_lr=c.lora_lr, r=c.lora_r, alpha=c.lora_alpha,
      lora_multi_pct=round(100 * c.lora_multi_fraction), eval_n=c.eval_examples,
      n_paragraphs=len(tasks_lib.prose_paragraphs()),
      prose_kb=sum(len(p) for p in tasks_lib.prose_paragraphs()) / 1e3,
      n_modules=len(tasks_lib.PROSE_MODULES))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


REPORT = """\
# {title}

`{where}` ships a small byte-level Llama trained in this repo and {n_tasks} task LoRAs in
PEFT format, so that demos, the server and the notebooks show adapters doing something a person
can check at a glance, on a machine with no model hub.

```python
import jaxadapt as ja
model = ja.load_model("{name}")              # a Hugging Face dir (transformers loads it too)
reverse = ja.load_adapter("{name}:reverse")  # a PEFT dir (peft's PeftModel loads it too)
model.generate("[reverse] hello\\n", adapter=reverse).text[0]   # '[reverse] olleh'
```

## Accuracy (greedy exact match on held-out inputs)

{table}

Each row: the task's {eval_n} held-out prompts (inputs never seen in training, by the base or any
adapter), answered by greedy `model.generate` (jaxadapt/generate.py) from the exported files,
loaded as users load them, and stopped by eos; an answer counts only if it equals the oracle's
(`jaxadapt.default.answer`) and ends with eos. "base alone": the same prompts without the
adapter (the base knows the format and its own skills, none of the tasks). "in 2-task
prompts": the task's held-out input beside another task's held-out input (in either order), the
adapter alone, the other segment's answer given (teacher forced); the share whose own answer
segment is exact.
Adapters that locate their input by its distance from the answer (reverse, count) compose
least: gating them per token (MeteoRA) is where that gets tested.

Rebuilt by

    {command}

in **{total}**: {base_time} base pre-training, {adapters_time} for the {n_tasks} adapters,
{eval_time} export and evaluation; on {machine} shared with other work (load average
{load_start:.1f} at the start, {load_end:.1f} at the end), Python {python}, jax {jax}. The
shipped files (model/ and adapters/) total **{size_mb:.1f} MB**.

## Format

A prompt is one or more segments `[task] input` joined by spaces and ended by a newline; the
answer restates each segment's tag with its output, the segments joined by spaces, then eos:

```
<bos>[reverse] hello\\n                    ->  [reverse] olleh<eos>
<bos>[reverse] hello [upper] world\\n      ->  [reverse] olleh [upper] WORLD<eos>
```

The tokenizer adds `<bos>`; `jaxadapt.default.prompt("reverse", "hello")` builds a prompt, and
the chat template (a user message is a prompt without its newline, an assistant message an
answer) gives the same tokens. Inputs never hold `[` or a newline, so prompts and answers split
into their segments at `" ["`. Inputs are short: 3-8 lowercase letters (reverse, sort, rot13),
1-10 letters (count), one or two lowercase words of 3-10 characters in all (upper), 3-8 letters
of mixed case (swapcase), 3-8 digits (max), 2-4 three-letter words with a repeat (dedupe).

Each adapter is trained on its own answer segments only: the tag, the output and the delimiter
after it (the space before the next segment, or eos). {lora_multi_pct}% of its training examples
hold its segment among one or two segments of other tasks, whose answers are given as context,
so that adapters gated per token (MeteoRA) compose on multi-task prompts.

## Architecture and files

- `model/`: `LlamaForCausalLM` ({params_m:.2f}M parameters, float32): hidden {hidden}, MLP {inter},
  {layers} layers, {heads} query heads and {kv} key/value heads (grouped-query attention) of
  width {head_dim}, RoPE, tied input/output embeddings, context {max_pos} tokens. Vocabulary
  {vocab}: ids 0-255 are the bytes, then `<pad>` 256, `<bos>` 257, `<eos>` 258 (259-263 unused,
  so the embedding has a multiple of 8 rows). `tokenizer.json` is a `tokenizers` byte-level BPE
  without merges (one token per byte); `tokenizer_config.json` holds the special tokens and the
  chat template; `generation_config.json` the eos.
- `adapters/<task>/`: `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them
  (`jaxadapt.save_adapter`): LoRA r={r}, alpha={alpha:g} on every linear layer of the decoder
  (q, k, v, o, gate, up, down; the tied lm_head cannot take one).
- float32, not bfloat16: the files fit the 25 MB budget either way, and float32 keeps
  jaxadapt's and transformers' logits equal to float rounding (the tests compare them).

## Training

1. **Base** (every parameter, `train.loop.Trainer`): {base_steps} steps of {base_batch} rows x
   {seq_len} tokens, AdamW (peak lr {base_lr:g}, warmup + cosine, decay 0.1 on matrices).
   {prose_pct}% of the rows are prose: the docstrings of {n_modules} Python standard-library
   modules (`train.tasks.PROSE_MODULES`, a fixed order; {n_paragraphs} paragraphs, {prose_kb:.0f}
   kB on Python {python}; another Python version gives slightly different prose). The others pack
   whole examples of four base skills that are none of the tasks: `[copy] x` -> `[copy] x`,
   `[repeat] x` -> `[repeat] x x`, `[spell] abc` -> `[spell] a b c` (on inputs of every task's
   kind) and `[inc] 199` -> `[inc] 200` (1-3 digit numbers), {multi_pct}% with 2-3 segments, so
   that the base knows the format, the restated tags and the byte strings, but not the tasks.
2. **Adapters** (the base frozen, the same trainer): steps of {lora_batch} rows x {seq_len}
   tokens (whole examples packed into a row, each from its own bos), AdamW (peak lr
   {lora_lr:g}, warmup + cosine). The steps per task go where the accuracy needs them:
   {lora_steps}.

Rebuild: `python -m train.default_model` (every shipped file and this page), `--out DIR` to write
elsewhere, `--work_dir DIR` to keep checkpoints (a killed run then resumes), `--quick` for a
tiny pipeline check. Any config field is a flag (`--help` lists them).

## Deviations

- `add` (two numbers of 1-3 digits, `12+345` -> `357`) was replaced by `max`: it proved
  unlearnable by a LoRA in the time budget. Measured (teacher-forced exact match on its held-out
  set): 1.6% after 200 steps on 1-3 digit numbers, 8% after 400 steps on 1-2 digit numbers, and
  2% after 300 steps on 1-3 digits with a longer-trained base that also knows `[inc]`, where the
  other tasks reached 80-100% in 150-300 steps. The base knows no arithmetic; the adapter would
  have to learn the addition table and the carries (most significant digit first) alone.
- The adapters target the decoder's linear layers only: a LoRA on the tied `lm_head` is not
  supported (jaxadapt refuses it, and PEFT's "all-linear" leaves the output layer out too).
- Batches pack several whole examples into a row, each from its own bos, and an example attends
  to the ones before it in its row (the model takes a padding mask, not a block-diagonal one);
  evaluation and generation put one example at position 0, as users do.
- The 2 cores were shared with other jobs while the time above was measured; an earlier run of
  the same pipeline (dedupe 600 steps instead of 900, four easy tasks 20-30 steps more) took
  32 min 36 s under a load average of about 3.5.
"""


# --- command line ---------------------------------------------------------------------------------

def config_from_argv(argv: Sequence[str]) -> DefaultModelConfig:
  """`--config NAME` (default default_model; `--quick` = default_model_quick) with field
  overrides (`--out DIR` included), see `train.flags`."""
  argv = list(argv)
  if "--quick" in argv:
    argv.remove("--quick")
    if any(a == "--config" or a.startswith("--config=") for a in argv):
      raise flags.FlagError("--quick is --config default_model_quick; give one of them")
    argv = ["--config", "default_model_quick", *argv]
  return flags.config_from_argv(argv, default="default_model", cls=DefaultModelConfig,
                                doc=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.default_model`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    config = config_from_argv(argv)
  except (flags.FlagError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  command = " ".join(["python -m train.default_model", *argv])
  try:
    result = build(config, command=command)
  except (FileNotFoundError, RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(results_table(result.results))
  print(f"shipped files: {result.bytes / 1e6:.2f} MB in {config.out}; report: {result.report}")
  print(f"rebuilt in {_minutes(result.seconds['total'])} (base {_minutes(result.seconds['base'])}, "
        f"adapters {_minutes(result.seconds['adapters'])}, eval "
        f"{_minutes(result.seconds['eval'])})")
  return 0


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.default_model.DefaultModelConfig` is
  # this class.
  from train import default_model as _default_model
  sys.exit(_default_model.main())
