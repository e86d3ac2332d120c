"""MUSCLE: task LoRAs on two model versions, then a compatibility adapter that flips less.

  python -m train.muscle --config train/configs/muscle_toy.py     # the reproduction (docs/muscle.md)
  python -m train.muscle --config muscle_tiny --out_dir /tmp/m    # seconds: the pipeline only
  jaxadapt train muscle ARGS                                      # the same (`main(argv)`)

Paper: "MUSCLE: A Model Update Strategy for Compatible LLM Evolution" (Echterhoff et al., EMNLP
Findings 2024). For each seed and task of the config, on the shared trainer (`train.loop`):
  1. the task LoRA on the old base v1 (Mv1 = v1 + LoRA1) and on the new base v2 (Mv2 = v2 +
     LoRA2), the same procedure and data for both (only the base changed: the paper's setting);
  2. from LoRA2, on the frozen v2 base, the same number of extra steps of each of:
       "muscle"        M^C, the compatibility adapter: MUSCLE Eq. 1 (`jaxadapt.muscle.compat_loss`,
                       per answer token: distil from Mv1 where M^C's argmax is wrong, from Mv2
                       where it is right; T = 2);
       "kd_v1"         distillation to Mv1 on every token (the mask always 1);
       "ce_continued"  plain cross-entropy (the control: extra training alone);
     both teachers frozen (v1 and v2 may differ in architecture: they share the tokenizer);
  3. greedy answers of every model on the task's held-out prompts; accuracy, NFR, PFR and NFR_mc
     of each against Mv1 (`jaxadapt.muscle`), mean +- standard error over the seeds, and the
     paired per-seed differences that the targets are about; `docs/muscle.md` and a PNG.

Every stage checkpoints (orbax) under `out_dir/seed<s>/<task>/<stage>/`; rerunning the command
resumes where it stopped (a finished stage is restored, not retrained). The adapters are written
as PEFT dirs (`.../<stage>/adapter`), so `jaxadapt compat --old default:<lora1 dir> ...` and
`ja.load_adapter` read them. `data_parallel` splits each batch over a data mesh axis.

References:
  MUSCLE (Echterhoff et al., 2024) Sec. 3 (metrics) and Eq. 1 (the loss); LoRA (Hu et al., 2021);
  knowledge distillation (Hinton et al., 2015); AdamW (Loshchilov & Hutter, 2019).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxadapt import muscle as muscle_lib
from jaxadapt import sharding as sharding_lib
from jaxadapt.adapters import lora as lora_lib
from jaxadapt.causal_lm import CausalLM, forward, load_model
from jaxadapt.io.peft import save_adapter
from train import default_model
from train import flags
from train import lm
from train import loop
from train import tasks as tasks_lib
from train.loop import RunError

VARIANTS = ("muscle", "kd_v1", "ce_continued")  # the default compatibility variants
# What each compatibility variant trains with: (teacher mask of Eq. 1, cross-entropy weight;
# None = the config's ce_weight). "muscle_answer" (ours, not the paper's) distils a whole answer
# from v1 when the student gets any of its tokens wrong (`jaxadapt.muscle.teacher_mask`).
VARIANT_LOSS = {"muscle": ("muscle", None), "kd_v1": ("old", 0.0), "ce_continued": ("new", 1.0),
                "muscle_answer": ("answer", None)}
MODELS = ("v1", "v2", "muscle", "muscle_answer", "kd_v1", "ce_continued")  # the report's rows
LABELS = {"v1": "Mv1", "v2": "Mv2", "muscle": "M^C (MUSCLE)", "kd_v1": "KD-to-v1",
          "ce_continued": "CE-continued", "muscle_answer": "M^C, answer mask (ours)"}
REPO_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
# Fields that do not change what any stage trains (a resume may change them).
# What each stage trains on: a task LoRA on its fields alone (so that compatibility settings
# can change and the LoRAs be reused), a compatibility variant on those and its own. The other
# fields (out_dir, seeds, tasks, reporting, the mesh) do not change what a stage computes;
# eval_examples does (no stage trains on the held-out inputs).
_LORA_FIELDS = ("old_model", "new_model", "lora_r", "lora_alpha", "lora_targets", "lora_lr",
                "lora_warmup", "batch_size", "seq_len", "multi_fraction", "eval_examples")
_COMPAT_FIELDS = _LORA_FIELDS + ("compat_steps", "compat_lr", "compat_warmup", "temperature",
                                 "ce_weight", "lora_dir")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MuscleConfig:
  """Everything a MUSCLE run depends on; `train/configs/muscle_*.py` return one."""
  old_model: str = "default"            # v1: a Hugging Face dir or an embedded model name
  new_model: str = "default-v2"         # v2: the same tokenizer as v1
  tasks: tuple = ("sort", "dedupe")     # tasks of the embedded default (jaxadapt.default.TASKS)
  seeds: tuple = (0, 1, 2)              # each seed trains every stage again (init + data order)
  variants: tuple = VARIANTS            # the compatibility variants to train
  out_dir: str = "runs/muscle_toy"      # checkpoints, adapters and results.json
  lora_dir: Optional[str] = None        # a previous run's out_dir: its task LoRAs
                                        # (seed<s>/<task>/v1|v2/adapter) are loaded, not trained
                                        # (compatibility variants on given task adapters)
  report: Optional[str] = None          # the results page (+ a PNG beside it); None = none
  # Task LoRAs (the same procedure on both bases).
  lora_r: int = 4                       # rank
  lora_alpha: float = 8.0               # alpha (scale = alpha / r)
  lora_targets: tuple = default_model.LORA_TARGETS  # linear layers that take the LoRA
  lora_steps: int = 300                 # optimizer steps (to the plateau, see the config)
  lora_task_steps: tuple = ()           # "task=steps" items: tasks that need other steps
  lora_lr: float = 5e-3                 # peak learning rate (warmup + cosine)
  lora_warmup: int = 20                 # linear warmup steps
  batch_size: int = 16                  # rows per batch (every stage)
  seq_len: int = 64                     # tokens per row (whole examples packed)
  multi_fraction: float = 0.0           # examples holding other tasks' segments as context
  # The compatibility stage (from LoRA2, on the frozen v2 base).
  compat_steps: int = 150               # extra optimizer steps of every variant
  compat_lr: float = 2e-3               # peak learning rate (warmup + cosine)
  compat_warmup: int = 10               # linear warmup steps
  temperature: float = 2.0              # T of MUSCLE Eq. 1
  ce_weight: float = 0.0                # λ: loss = (1 - λ) Eq. 1 + λ CE, for "muscle"
  # Evaluation.
  eval_examples: int = 512              # held-out prompts per task (never trained on)
  bootstrap_samples: int = 1000         # resamples of the per-example confidence intervals
  data_parallel: int = 1                # mesh 'data' axis: each batch is split over it
  progress: bool = True                 # tqdm progress bars
  notes: tuple = ()                     # lines for the report's deviations (what the config
                                        # chose and why, with numbers measured)

  def __post_init__(self):
    for name in ("tasks", "seeds", "variants", "lora_targets", "lora_task_steps", "notes"):
      value = getattr(self, name)
      object.__setattr__(self, name, tuple(value.split(",") if isinstance(value, str)
                                           else value))
    object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
    loop.check_numbers(
        self, positive_ints=("lora_r", "lora_steps", "batch_size", "seq_len", "compat_steps",
                             "eval_examples", "bootstrap_samples", "data_parallel"),
        ints=("lora_warmup", "compat_warmup"),
        finite=("lora_alpha", "lora_lr", "compat_lr", "temperature", "ce_weight",
                "multi_fraction"))
    from jaxadapt.default import TASKS
    bad = [t for t in self.tasks if t not in TASKS]
    if bad or not self.tasks:
      raise ValueError(f"tasks must be some of the embedded default's tasks {TASKS}; got "
                       f"{self.tasks}")
    bad = [v for v in self.variants if v not in VARIANT_LOSS]
    if bad:
      raise ValueError(f"variants must be some of {tuple(VARIANT_LOSS)}; got {self.variants}")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct ints, at least one; got {self.seeds}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    for name in ("ce_weight", "multi_fraction"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    lm.check_batch_fields(self)
    self.lora_config()
    for task in self.tasks:
      self.lora_steps_of(task)

  def lora_steps_of(self, task: str) -> int:
    """The task LoRAs' optimizer steps for `task` (`lora_task_steps`, else `lora_steps`)."""
    return default_model.task_steps(self.lora_task_steps, task, self.lora_steps)

  def lora_config(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha,
                               target_modules=self.lora_targets)

  def to_record(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def _optimizer(steps: int, lr: float, warmup: int) -> loop.AdamW:
  return loop.AdamW(learning_rate=lr, steps=steps, warmup_steps=min(warmup, steps))


def _stage_record(config: MuscleConfig, stage: str, task: str, seed: int,
                  bases: dict) -> dict:
  fields = _LORA_FIELDS if stage in ("v1", "v2") else _COMPAT_FIELDS
  record = config.to_record()
  training = {k: record[k] for k in fields}
  training["lora_steps"] = config.lora_steps_of(task)
  return {"config": training, "stage": stage, "task": task, "seed": seed, "bases": bases}


def _base_fingerprint(model: CausalLM) -> dict:
  """What a stage's base is, for the resume check: its architecture and a checksum of its first
  8 parameter tensors (the embedding and the first layer's), so that another base at the same
  path is refused."""
  leaves = jax.tree.leaves(model.params)
  return {"config": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
          "checksum": float(sum(float(np.asarray(x, np.float64).sum()) for x in leaves[:8]))}


def task_batches(config: MuscleConfig, task: str, seed: int, stream: int):
  """`batches(position)` of a task's training examples: whole single-task examples (or with
  other tasks' segments as context, `multi_fraction`), never one of the held-out inputs.
  `stream` 0 is the task LoRAs' data, 1 the compatibility stage's (fresh examples)."""
  def batches(position):
    return tasks_lib.task_batch(task, position, config.batch_size, config.seq_len,
                                seed=seed * 1000 + stream, multi_fraction=config.multi_fraction,
                                heldout_n=config.eval_examples)
  return batches


# --- the losses ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompatLoss:
  """MUSCLE Eq. 1 (or a control) for a LoRA on the frozen v2 base, as a `loop.Trainer` loss.

  `frozen` = {"new": v2 params, "new_lora": LoRA2's weights (the v2 teacher), "old": v1
  params, "old_lora": LoRA1's weights}; the trainable tree is the student's LoRA weights (same
  config as LoRA2). The teachers run only when their term has weight.
  """
  new_graphdef: Any
  new_lora: lora_lib.LoraConfig
  old_graphdef: Any
  old_lora: lora_lib.LoraConfig
  mask: str = "muscle"          # jaxadapt.muscle.teacher_mask
  temperature: float = 2.0
  ce_weight: float = 0.0

  def __call__(self, trainable, frozen, batch, rng):
    del rng
    ids, attn = batch["input_ids"], batch["attention_mask"]

    def logits(graphdef, params, weights, config):
      ctx = lora_lib.context(lora_lib.LoraAdapter(weights=weights, config=config))
      return forward(graphdef, params, ids, attn, None, ctx)

    student = logits(self.new_graphdef, frozen["new"], trainable, self.new_lora)
    constant = jax.lax.stop_gradient(student)  # stands in for a teacher whose term is 0
    distil = self.ce_weight < 1
    new = (logits(self.new_graphdef, frozen["new"], frozen["new_lora"], self.new_lora)
           if distil and self.mask != "old" else constant)
    old = (logits(self.old_graphdef, frozen["old"], frozen["old_lora"], self.old_lora)
           if distil and self.mask != "new" else constant)
    return muscle_lib.compat_loss(student, old, new, batch["labels"],
                                  temperature=self.temperature, mask=self.mask,
                                  ce_weight=self.ce_weight)


# --- the stages ----------------------------------------------------------------------------------

def _stage_dir(config: MuscleConfig, seed: int, task: str, stage: str) -> str:
  return os.path.join(config.out_dir, f"seed{seed}", task, stage)


def train_task_lora(config: MuscleConfig, base: CausalLM, task: str, seed: int, which: str,
                    mesh, bases: dict) -> tuple[lora_lib.LoraAdapter, list]:
  """Trains the task LoRA on `base` (`which` = "v1" or "v2"): next-token loss on the task's
  answer segments. Returns the adapter and the run's per-step metrics."""
  lora_config = config.lora_config()
  key = jax.random.fold_in(jax.random.key(seed), tasks_lib.TASKS.index(task))
  weights = lora_lib.init_lora(base.params, base.linear_paths, lora_config, key).weights
  weights = sharding_lib.shard_adapter_weights(weights, mesh)
  steps = config.lora_steps_of(task)
  tx = _optimizer(steps, config.lora_lr, config.lora_warmup)
  out = _stage_dir(config, seed, task, which)
  with loop.Trainer(out, steps=steps, checkpoint_every=steps,
                    keep_checkpoints=1, progress=config.progress,
                    desc=f"seed {seed} {task} LoRA on {which}") as trainer:
    fit = trainer.fit(lm.NextTokenLoss(base.graphdef, lora=lora_config), tx, weights,
                      base.params, task_batches(config, task, seed, 0), mesh=mesh,
                      batch_size=config.batch_size, seed=seed,
                      record=_stage_record(config, which, task, seed, bases),
                      learning_rate=tx.schedule)
  adapter = lora_lib.LoraAdapter(weights=fit.trainable, config=lora_config)
  _export(adapter, out)
  return adapter, _read_metrics(out)


def given_task_lora(config: MuscleConfig, task: str, seed: int, which: str,
                    mesh) -> tuple[lora_lib.LoraAdapter, list]:
  """The task LoRA of `config.lora_dir` (a previous run) for (task, seed, which), on `mesh`."""
  stage = os.path.join(config.lora_dir, f"seed{seed}", task, which)
  path = os.path.join(stage, "adapter")
  if not os.path.isfile(os.path.join(path, "adapter_config.json")):
    raise RunError(f"--lora_dir {config.lora_dir}: no {which} task LoRA for seed {seed}, task "
                   f"{task!r} at {path} (expected a run of train.muscle with those seeds and "
                   f"tasks)")
  from jaxadapt.io.peft import load_adapter
  adapter = load_adapter(path)
  weights = sharding_lib.shard_adapter_weights(adapter.weights, mesh)
  return lora_lib.LoraAdapter(weights=weights, config=adapter.config), _read_metrics(stage)


def train_compat(config: MuscleConfig, variant: str, old: CausalLM, lora1: lora_lib.LoraAdapter,
                 new: CausalLM, lora2: lora_lib.LoraAdapter, task: str, seed: int, mesh,
                 bases: dict) -> tuple[lora_lib.LoraAdapter, list]:
  """Trains a compatibility variant (`VARIANT_LOSS`) from LoRA2 on the frozen v2 base."""
  mask, ce_weight = VARIANT_LOSS[variant]
  loss = CompatLoss(new.graphdef, lora2.config, old.graphdef, lora1.config, mask=mask,
                    temperature=config.temperature,
                    ce_weight=config.ce_weight if ce_weight is None else ce_weight)
  start = jax.tree.map(lambda x: x.copy(), lora2.weights)  # the trainer donates its buffers
  frozen = {"new": new.params, "new_lora": lora2.weights, "old": old.params,
            "old_lora": lora1.weights}
  tx = _optimizer(config.compat_steps, config.compat_lr, config.compat_warmup)
  out = _stage_dir(config, seed, task, variant)
  with loop.Trainer(out, steps=config.compat_steps, checkpoint_every=config.compat_steps,
                    keep_checkpoints=1, progress=config.progress,
                    desc=f"seed {seed} {task} {variant}") as trainer:
    fit = trainer.fit(loss, tx, start, frozen, task_batches(config, task, seed, 1), mesh=mesh,
                      batch_size=config.batch_size, seed=seed,
                      record=_stage_record(config, variant, task, seed, bases),
                      learning_rate=tx.schedule)
  adapter = lora_lib.LoraAdapter(weights=fit.trainable, config=lora2.config)
  _export(adapter, out)
  return adapter, _read_metrics(out)


def _export(adapter: lora_lib.LoraAdapter, stage_dir: str):
  if jax.process_index() == 0:
    save_adapter(jax.device_get(adapter), os.path.join(stage_dir, "adapter"))


def _read_metrics(stage_dir: str) -> list:
  path = os.path.join(stage_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plateau(metrics: list, window: float = 0.1) -> Optional[float]:
  """The relative change of the mean loss from the second-to-last to the last `window` of the
  steps (e.g. -0.02: the loss still fell 2%); None for runs too short to tell."""
  losses = [m["loss"] for m in metrics]
  k = int(len(losses) * window)
  if k < 2:
    return None
  before, last = np.mean(losses[-2 * k:-k]), np.mean(losses[-k:])
  return float((last - before) / before)


# --- evaluation ------------------------------------------------------------------------------------

def heldout(config: MuscleConfig, task: str) -> list:
  """The task's held-out examples (single segments; inputs no stage trains on)."""
  return [[s] for s in tasks_lib.heldout_segments(task, config.eval_examples)]


def write_compat_data(config: MuscleConfig, path: str):
  """The held-out prompts of every task as a `jaxadapt compat` data file (.jsonl: prompt,
  answer, category = the task), so that any two of the run's models compare from the command
  line (`jaxadapt compat --old default:<dir>/seed0/sort/v1/adapter --new ...`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for task in config.tasks:
      for e in heldout(config, task):
        f.write(json.dumps({"prompt": tasks_lib.prompt_text(e),
                            "answer": tasks_lib.answer_text(e), "category": task}) + "\n")


def flip_table(answers_by_model: dict, references: Sequence[str]) -> dict:
  """Accuracy, NFR, PFR and NFR_mc of each model against Mv1 (`jaxadapt.muscle`), from the
  greedy answers: "right" is exact match with the reference, NFR_mc counts the answers that
  are wrong and differ from Mv1's (MUSCLE Sec. 3)."""
  ref = np.asarray(references, dtype=object)
  old = np.asarray(answers_by_model["v1"], dtype=object)
  out = {}
  for name, got in answers_by_model.items():
    out[name] = muscle_lib.choice_flip_rates(old, np.asarray(got, dtype=object), ref)
  return out


# --- the whole run ---------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
  """What `train` returns: the per-seed tables and the summary."""
  results: dict          # {seed: {task: {"flips": flip_table, "plateau": {...}, ...}}}
  summary: dict          # `summarize(results)`
  seconds: dict


def _load_base(spec: str, mesh) -> CausalLM:
  try:
    return load_model(spec, sharding=mesh)
  except FileNotFoundError as e:
    raise RunError(f"cannot load the base {spec!r}: {e}") from None


def train(config: MuscleConfig, *, command: Optional[str] = None) -> RunResult:
  """Runs (or resumes) every stage for every seed and task, evaluates, writes the report."""
  t0 = time.time()
  seconds = {"load_start": os.getloadavg()[0]}
  mesh = loop.data_mesh(config.data_parallel)
  old, new = _load_base(config.old_model, mesh), _load_base(config.new_model, mesh)
  if old.config.vocab_size != new.config.vocab_size:
    raise RunError(f"v1 ({config.old_model}) has a vocabulary of {old.config.vocab_size} and v2 "
                   f"({config.new_model}) of {new.config.vocab_size}: MUSCLE distils v1's "
                   f"token distributions into v2, so both must share one tokenizer")
  bases = {"v1": _base_fingerprint(old), "v2": _base_fingerprint(new)}
  results = {}
  for seed in config.seeds:
    for task in config.tasks:
      t1 = time.time()
      if config.lora_dir is None:
        lora1, m1 = train_task_lora(config, old, task, seed, "v1", mesh, bases)
        lora2, m2 = train_task_lora(config, new, task, seed, "v2", mesh, bases)
      else:
        (lora1, m1), (lora2, m2) = (given_task_lora(config, task, seed, w, mesh)
                                    for w in ("v1", "v2"))
      seconds[f"seed{seed}_{task}_loras"] = time.time() - t1
      models = {"v1": (old, lora1), "v2": (new, lora2)}
      curves = {"v1": m1, "v2": m2}
      for variant in config.variants:
        t2 = time.time()
        adapter, curves[variant] = train_compat(config, variant, old, lora1, new, lora2, task,
                                                seed, mesh, bases)
        models[variant] = (new, adapter)
        seconds[f"seed{seed}_{task}_{variant}"] = time.time() - t2
      t3 = time.time()
      examples = heldout(config, task)
      refs = [tasks_lib.answer_text(e) for e in examples]
      got = {name: default_model.generated_answers(m, a, examples)
             for name, (m, a) in models.items()}
      seconds[f"seed{seed}_{task}_eval"] = time.time() - t3
      results.setdefault(seed, {})[task] = {
          "flips": flip_table(got, refs),
          "plateau": {name: plateau(c) for name, c in curves.items()},
          "mask_old": {name: float(np.mean([r["mask_old"] for r in c[-10:]]))
                       for name, c in curves.items() if name in VARIANT_LOSS and c},
          "answers": {name: a[:8] for name, a in got.items()}, "references": refs[:8],
          "per_example": {name: [a == r for a, r in zip(g, refs)] for name, g in got.items()},
      }
      if jax.process_index() == 0:  # what is done so far, for a look while the run goes on
        os.makedirs(config.out_dir, exist_ok=True)
        with open(os.path.join(config.out_dir, "results.partial.json"), "w") as f:
          json.dump({"results": results, "seconds": seconds}, f)
  seconds["total"] = time.time() - t0
  seconds["load_end"] = os.getloadavg()[0]
  summary = summarize(config, results)
  if jax.process_index() == 0:
    write_compat_data(config, os.path.join(config.out_dir, "heldout.jsonl"))
    command = command or "python -m train.muscle " + " ".join(sys.argv[1:])
    with open(os.path.join(config.out_dir, "results.json"), "w") as f:
      json.dump({"config": config.to_record(), "results": results, "summary": summary,
                 "seconds": seconds, "command": command}, f, indent=1)
    if config.report:
      from train import muscle_report
      muscle_report.write_report(config, results, summary, seconds, old, new, command)
  return RunResult(results=results, summary=summary, seconds=seconds)


def summarize(config: MuscleConfig, results: dict) -> dict:
  """Mean +- standard error over the seeds of every model's metrics (per task and pooled over
  the tasks: each seed's mean over tasks), and the paired per-seed differences of M^C against
  Mv2, CE-continued and KD-to-v1 with the targets' verdicts.

  Returns:
    {"per_task": {task: {model: {metric: [mean, se]}}}, "pooled": {model: {metric: [mean,
    se]}}, "differences": {name: {metric: [mean, se]}}, "targets": {...}}.
  """
  metrics = ("accuracy_new", "nfr", "pfr", "nfr_mc")
  seeds = list(results)

  def per_seed(model, metric, tasks):
    return [float(np.mean([results[s][t]["flips"][model][metric] for t in tasks]))
            for s in seeds]

  models = [m for m in MODELS if m in ("v1", "v2", *config.variants)]
  out = {"per_task": {}, "pooled": {}, "differences": {}}
  for task in config.tasks:
    out["per_task"][task] = {m: {k: list(muscle_lib.mean_and_standard_error(
        per_seed(m, k, [task]))) for k in metrics} for m in models}
  out["pooled"] = {m: {k: list(muscle_lib.mean_and_standard_error(
      per_seed(m, k, config.tasks))) for k in metrics} for m in models}
  pairs = [("muscle", "v2"), ("muscle", "ce_continued"), ("muscle", "kd_v1"),
           ("muscle_answer", "v2"), ("muscle_answer", "ce_continued"),
           ("muscle_answer", "kd_v1")]
  for a, b in pairs:
    if a in models and b in models:
      out["differences"][f"{a}-{b}"] = {k: list(muscle_lib.mean_and_standard_error(
          np.subtract(per_seed(a, k, config.tasks), per_seed(b, k, config.tasks))))
          for k in metrics}
  d = out["differences"]
  if len(seeds) > 1 and all(p in d for p in ("muscle-v2", "muscle-ce_continued",
                                              "muscle-kd_v1")):  # 2 SE need 2+ seeds
    def lower(name):
      mean, se = d[name]["nfr"]
      return mean < 0 and abs(mean) > 2 * se
    acc_mean, acc_se = d["muscle-v2"]["accuracy_new"]
    out["targets"] = {
        "nfr_below_v2": lower("muscle-v2"),
        "nfr_below_ce_continued": lower("muscle-ce_continued"),
        "accuracy_at_least_v2": acc_mean >= 0 or abs(acc_mean) <= 2 * acc_se,
        "accuracy_above_kd_v1": d["muscle-kd_v1"]["accuracy_new"][0] > 0,
    }
  return out


# --- command line ------------------------------------------------------------------------------------

def config_from_argv(argv: Sequence[str]) -> MuscleConfig:
  """`--config NAME` (default muscle_toy) with field overrides, see `train.flags`."""
  return flags.config_from_argv(argv, default="muscle_toy", cls=MuscleConfig, doc=__doc__)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `python -m train.muscle` and `jaxadapt train muscle`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  command = " ".join(["python -m train.muscle", *argv])

  def summary(config, result):
    from train import muscle_report
    return (muscle_report.summary_table(result.summary) + "\n"
            + f"results in {os.path.join(config.out_dir, 'results.json')}"
            + (f"; report {config.report}" if config.report else "")
            + f"; {result.seconds['total'] / 60:.1f} min")
  return loop.run_main(argv, config_from_argv=config_from_argv,
                       train=lambda config: train(config, command=command), summary=summary)


if __name__ == "__main__":
  # Run through the importable module, so configs' `train.muscle.MuscleConfig` is this class.
  from train import muscle as _muscle
  sys.exit(_muscle.main())
