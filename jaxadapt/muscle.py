"""MUSCLE: compatibility between model versions (negative flips) and the compatibility loss.

Paper: "MUSCLE: A Model Update Strategy for Compatible LLM Evolution" (Echterhoff, Faghri,
Vemulapalli, Hu, Li, Tuzel, Pouransari; EMNLP Findings 2024). When a base model is updated
(v1 -> v2) and its task adapter retrained, some answers the old task model got right, the new one
gets wrong: *negative flips*. This module holds the paper's metrics and its loss as pure
functions; `jaxadapt compat` (jaxadapt/compat.py) and `train/muscle.py` use them.

Metrics (MUSCLE Sec. 3, "Model update regression"), for N examples, the old model's and the new
model's predictions ŷ1, ŷ2 and the references y:
  accuracy          (1/N) Σ 1[ŷ = y]
  NFR               (1/N) Σ 1[ŷ1 = y ∧ ŷ2 ≠ y]       negative flips (v1 right, v2 wrong)
  PFR               (1/N) Σ 1[ŷ1 ≠ y ∧ ŷ2 = y]       positive flips (v1 wrong, v2 right)
  NFR_mc            (1/N) Σ 1[ŷ2 ≠ y ∧ ŷ1 ≠ ŷ2]      multiple choice: v2 wrong *and* it changed
                                                     its answer (the negative flips, plus the
                                                     cases where both are wrong differently)
For generative tasks with a per-example score s ∈ [0, 1] (ROUGE-1 F1, exact match; MUSCLE's
"continuous" form), with d = s2 - s1:
  PFR_s = (1/N) Σ 1[d > 0],  NFR_s = (1/N) Σ 1[d < 0],
  m_g = mean of d over the examples with d > 0 (how much the gains gain),
  m_r = mean of -d over the examples with d < 0 (how much the regressions lose).
Every metric comes with a percentile-bootstrap confidence interval over the examples
(`bootstrap`, paired: one resample of example indices serves both models).

Loss (MUSCLE Eq. 1): the compatibility adapter M^C (a LoRA on the frozen v2 base, initialised
from the v2 task adapter) is distilled per answer token i from the old task model where it is
wrong and from the new task model where it is right:
  L = (1/n) Σ_i [ m_i KL(σ(z_v1,i / T) ‖ σ(z_C,i / T)) + (1 - m_i) KL(σ(z_v2,i / T) ‖ σ(z_C,i / T)) ]
  m_i = 1[argmax z_C,i ≠ y_i],   T = 2,
over the n answer tokens of the batch (teacher-forced on the reference answers).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100  # the label of a position that is not an answer token (train.data.IGNORE)
MASKS = ("muscle", "answer", "old", "new")  # which teacher each token distils from
                                            # (`teacher_mask`)


# --- per-example metrics ---------------------------------------------------------------------

def _bools(name: str, x) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be one value per example ([N]), got shape {a.shape}")
  if a.dtype != bool and not np.isin(a, (0, 1)).all():
    raise ValueError(f"{name} must hold booleans (right / wrong per example), got values "
                     f"{np.unique(a)[:5]}")
  return a.astype(bool)


def _same_length(**arrays) -> int:
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"one value per example in each of {list(sizes)}, got lengths {sizes}")
  n = next(iter(sizes.values()))
  if n == 0:
    raise ValueError("the metrics need at least one example, got 0")
  return n


def flip_rates(old_correct, new_correct) -> dict:
  """Accuracies and flip rates of two model versions on the same examples (MUSCLE Sec. 3).

  Args:
    old_correct, new_correct: [N] bool, whether v1 / v2 got example i right.

  Returns:
    {"accuracy_old", "accuracy_new", "nfr", "pfr"} as floats in [0, 1]: NFR is the share of
    examples v1 got right and v2 wrong, PFR the share v1 got wrong and v2 right.
  """
  old, new = _bools("old_correct", old_correct), _bools("new_correct", new_correct)
  _same_length(old_correct=old, new_correct=new)
  return {"accuracy_old": float(old.mean()), "accuracy_new": float(new.mean()),
          "nfr": float((old & ~new).mean()), "pfr": float((~old & new).mean())}


def choice_flip_rates(old_pred, new_pred, labels) -> dict:
  """`flip_rates` of multiple-choice predictions, plus NFR_mc (MUSCLE Sec. 3).

  Args:
    old_pred, new_pred: [N] int, the choice each version picked.
    labels: [N] int, the right choice.

  Returns:
    `flip_rates`' keys and "nfr_mc": the share of examples that v2 gets wrong with another answer
    than v1's (a negative flip, or both wrong with different answers).
  """
  old, new, y = (np.asarray(a) for a in (old_pred, new_pred, labels))
  for name, a in (("old_pred", old), ("new_pred", new), ("labels", y)):
    if a.ndim != 1:
      raise ValueError(f"{name} must be one choice index per example ([N]), got shape {a.shape}")
  _same_length(old_pred=old, new_pred=new, labels=y)
  return {**flip_rates(old == y, new == y), "nfr_mc": float(((new != y) & (old != new)).mean())}


def score_flip_rates(old_score, new_score) -> dict:
  """The score-difference form of the flip rates for generative tasks (MUSCLE Sec. 3).

  Args:
    old_score, new_score: [N] float, a per-example score of v1 / v2 (ROUGE-1 F1, exact match).

  Returns:
    {"score_old", "score_new": mean scores, "pfr": share with s2 > s1, "nfr": share with
    s2 < s1, "m_g": mean gain s2 - s1 over the positive flips, "m_r": mean loss s1 - s2 over the
    negative flips} (m_g, m_r are 0.0 when there is no such flip).
  """
  old, new = (np.asarray(a, np.float64) for a in (old_score, new_score))
  for name, a in (("old_score", old), ("new_score", new)):
    if a.ndim != 1 or not np.isfinite(a).all():
      raise ValueError(f"{name} must be one finite score per example ([N]), got shape {a.shape}"
                       f"{'' if a.ndim != 1 else ' with non-finite values'}")
  _same_length(old_score=old, new_score=new)
  d = new - old
  gains, losses = d[d > 0], -d[d < 0]
  return {"score_old": float(old.mean()), "score_new": float(new.mean()),
          "pfr": float((d > 0).mean()), "nfr": float((d < 0).mean()),
          "m_g": float(gains.mean()) if gains.size else 0.0,
          "m_r": float(losses.mean()) if losses.size else 0.0}


# --- scores of generated text ------------------------------------------------------------------

def _words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def rouge1(prediction: str, reference: str) -> float:
  """ROUGE-1 F1 (Lin, 2004): the harmonic mean of unigram precision and recall, with words
  lower-cased and split at every character that is not a letter or digit (as the
  `rouge-score` package tokenizes, without stemming). 1.0 when both have no words."""
  pred, ref = _words(prediction), _words(reference)
  if not pred or not ref:
    return float(pred == ref)
  counts: dict = {}
  for w in ref:
    counts[w] = counts.get(w, 0) + 1
  overlap = 0
  for w in pred:
    if counts.get(w, 0):
      counts[w] -= 1
      overlap += 1
  if overlap == 0:
    return 0.0
  p, r = overlap / len(pred), overlap / len(ref)
  return 2 * p * r / (p + r)


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the texts are equal after stripping surrounding whitespace, else 0.0."""
  return float(prediction.strip() == reference.strip())


# --- confidence intervals ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Estimate:
  """A metric's value on the examples and its bootstrap confidence interval."""
  value: float
  low: float
  high: float

  def to_json(self) -> dict:
    return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(metric: Callable[..., Mapping[str, float]], *arrays, samples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
  """Every value of `metric(*arrays)` with its percentile-bootstrap interval (Efron, 1979).

  The resamples draw N example indices with replacement and apply them to every array at once
  (paired: the two model versions are compared on the same resampled examples).

  Args:
    metric: `metric(*arrays) -> {name: float}`, e.g. `flip_rates`.
    arrays: per-example arrays, all of length N.
    samples: bootstrap resamples.
    confidence: the interval's coverage (0.95: the 2.5% and 97.5% percentiles).
    seed: of the resampling.

  Returns:
    {name: Estimate(value on the data, low, high)}.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if not isinstance(samples, int) or samples < 1:
    raise ValueError(f"samples must be a positive int, got {samples!r}")
  arrays = [np.asarray(a) for a in arrays]
  n = _same_length(**{f"array {i}": a for i, a in enumerate(arrays)})
  point = metric(*arrays)
  rng = np.random.default_rng(seed)
  draws = {k: np.empty(samples) for k in point}
  for j in range(samples):
    idx = rng.integers(0, n, size=n)
    for k, v in metric(*(a[idx] for a in arrays)).items():
      draws[k][j] = v
  tail = 100 * (1 - confidence) / 2
  return {k: Estimate(float(point[k]), float(np.percentile(draws[k], tail)),
                      float(np.percentile(draws[k], 100 - tail))) for k in point}


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
  """The mean of per-seed values and its standard error (sample std / sqrt(n); 0 for one)."""
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"expected a non-empty list of per-seed values, got shape {v.shape}")
  se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
  return float(v.mean()), se


# --- the compatibility loss (MUSCLE Eq. 1) -----------------------------------------------------

def _log_softmax(z, temperature):
  return jax.nn.log_softmax(z.astype(jnp.float32) / temperature, axis=-1)


def _any_in_answer(flags: jax.Array, valid: jax.Array) -> jax.Array:
  """[B, S]: at each valid position, whether `flags` is set anywhere in its answer (a maximal
  run of consecutive valid positions of its row)."""
  b, s = valid.shape
  start = valid & ~jnp.pad(valid, ((0, 0), (1, 0)))[:, :-1]
  span = jnp.cumsum(start, axis=1) + (s + 1) * jnp.arange(b)[:, None]  # unique per row
  hit = jax.ops.segment_max(jnp.where(valid, flags, False).astype(jnp.int32).reshape(-1),
                            span.reshape(-1), num_segments=b * (s + 1))
  return (hit[span] > 0) & valid


def teacher_mask(student_logits: jax.Array, labels: jax.Array, mask: str = "muscle",
                 valid: Optional[jax.Array] = None) -> jax.Array:
  """m_i of MUSCLE Eq. 1 at each position: 1 where the student's argmax is not the label (the
  token then distils from the old model), 0 where it is (from the new model).

  Args:
    student_logits: [B, S, V] the compatibility model's logits at the positions of `labels`.
    labels: [B, S] the reference tokens.
    mask: "muscle" (Eq. 1, per token); "answer" (ours, not the paper's: 1 on every token of an
      answer the student gets wrong anywhere, so that a whole flipped answer distils from v1,
      not only its wrong tokens; an answer is a run of consecutive `valid` positions); "old"
      (always 1: plain distillation to v1, the KD-to-v1 baseline) or "new" (always 0).
    valid: [B, S] bool, the answer positions (needed by "answer").

  Returns:
    [B, S] float32 in {0, 1} (no gradient flows through it).
  """
  if mask == "old":
    return jnp.ones(labels.shape, jnp.float32)
  if mask == "new":
    return jnp.zeros(labels.shape, jnp.float32)
  if mask not in MASKS:
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
  wrong = jnp.argmax(jax.lax.stop_gradient(student_logits), axis=-1) != labels
  if mask == "answer":
    if valid is None:
      raise ValueError("mask='answer' needs `valid` (the answer positions)")
    wrong = _any_in_answer(wrong, valid)
  return wrong.astype(jnp.float32)


def compat_loss(student_logits: jax.Array, old_logits: jax.Array, new_logits: jax.Array,
                labels: jax.Array, *, temperature: float = 2.0, mask: str = "muscle",
                ce_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """MUSCLE Eq. 1 over the answer tokens of a batch, optionally mixed with cross-entropy.

  `logits[:, t]` predicts `labels[:, t + 1]` (causal LM layout, as `train.lm.causal_lm_loss`):
  the loss is taken at each position t whose next label is an answer token (not IGNORE),
    KL(p || q) = Σ_v p_v (log p_v - log q_v),  p = σ(z_teacher / T),  q = σ(z_C / T),
  with the teacher v1 where m_t = 1 and v2 where m_t = 0 (`teacher_mask`), averaged over the
  answer tokens; then `(1 - ce_weight) * KD + ce_weight * CE` with CE the mean next-token
  cross-entropy of the student on the same tokens (ce_weight=1 is plain continued training).

  Args:
    student_logits, old_logits, new_logits: [B, S, V] the compatibility model's, the old task
      model's and the new task model's logits on the same tokens (the teachers' are constants).
    labels: [B, S] token ids, IGNORE where not an answer token.
    temperature: T of Eq. 1 (the paper uses 2).
    mask: see `teacher_mask`.
    ce_weight: λ in [0, 1] of the cross-entropy mix.

  Returns:
    (loss [] float32, {"kd", "ce", "mask_old": share of answer tokens distilled from v1,
    "student_acc": share of answer tokens the student's argmax gets right}).
  """
  shapes = {"student_logits": student_logits.shape, "old_logits": old_logits.shape,
            "new_logits": new_logits.shape}
  if len(set(shapes.values())) != 1 or student_logits.ndim != 3:
    raise ValueError(f"compat_loss needs three [B, S, V] logits of one shape (the models must "
                     f"share a tokenizer); got {shapes}")
  if labels.shape != student_logits.shape[:2]:
    raise ValueError(f"labels must be [B, S] = {student_logits.shape[:2]}, got {labels.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0 <= ce_weight <= 1:
    raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
  z_c, z_1, z_2 = (z[:, :-1] for z in (student_logits, old_logits, new_logits))
  target = labels[:, 1:]
  valid = (target != IGNORE).astype(jnp.float32)
  safe = jnp.where(target == IGNORE, 0, target)
  m = teacher_mask(z_c, safe, mask, valid=target != IGNORE)
  log_q = _log_softmax(z_c, temperature)

  def kl(z_teacher):
    log_p = _log_softmax(jax.lax.stop_gradient(z_teacher), temperature)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

  per_token = m * kl(z_1) + (1.0 - m) * kl(z_2)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  kd = jnp.sum(per_token * valid) / n
  log_c = jax.nn.log_softmax(z_c.astype(jnp.float32), axis=-1)
  ce = -jnp.sum(jnp.take_along_axis(log_c, safe[..., None], axis=-1)[..., 0] * valid) / n
  loss = (1.0 - ce_weight) * kd + ce_weight * ce
  metrics = {"kd": kd, "ce": ce, "mask_old": jnp.sum(m * valid) / n,
             "student_acc": jnp.sum((jnp.argmax(z_c, -1) == safe) * valid) / n}
  return loss, metrics


# --- a report over two model versions ------------------------------------------------------------

@dataclasses.dataclass
class CompatReport:
  """The compatibility of two model versions on one data set, overall and per category.

  `overall` and each `by_category[name]` map a metric name to its `Estimate`; `kind` is
  "choice" (multiple choice: `choice_flip_rates`) or "generate" (greedy answers: `flip_rates` on
  exact match, and `score_flip_rates` of ROUGE-1 under "rouge1_*" keys).
  """
  kind: str
  old: str                      # what the old version is (MODEL[:ADAPTER])
  new: str
  n: int                        # examples
  overall: dict
  by_category: dict
  confidence: float = 0.95

  def to_json(self) -> dict:
    return {"kind": self.kind, "old": self.old, "new": self.new, "n": self.n,
            "confidence": self.confidence,
            "overall": {k: e.to_json() for k, e in self.overall.items()},
            "by_category": {c: {"n": m["n"], **{k: e.to_json() for k, e in m.items() if k != "n"}}
                            for c, m in self.by_category.items()}}


def _kind_metrics(kind: str):
  if kind == "choice":
    return choice_flip_rates
  if kind == "generate":
    def generate_metrics(old_em, new_em, old_rouge, new_rouge):
      out = flip_rates(old_em.astype(bool), new_em.astype(bool))
      out.update({f"rouge1_{k}": v for k, v in score_flip_rates(old_rouge, new_rouge).items()})
      return out
    return generate_metrics
  raise ValueError(f"kind must be 'choice' or 'generate', got {kind!r}")


def compat_report(kind: str, per_example: Sequence, categories: Optional[Sequence[str]] = None,
                  *, old: str = "old", new: str = "new", samples: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> CompatReport:
  """A `CompatReport` from per-example results.

  Args:
    kind: "choice" with `per_example = (old_pred, new_pred, labels)`; or "generate" with
      `per_example = (old_exact, new_exact, old_rouge1, new_rouge1)`.
    categories: [N] a category name per example (e.g. the task); None = one category "all".
    old, new: names of the versions for the report.
    samples, confidence, seed: of `bootstrap`.
  """
  metric = _kind_metrics(kind)
  arrays = [np.asarray(a) for a in per_example]
  n = _same_length(**{f"array {i}": a for i, a in enumerate(arrays)})
  cats = np.asarray(["all"] * n if categories is None else [str(c) for c in categories])
  if len(cats) != n:
    raise ValueError(f"categories must give one name per example ({n}), got {len(cats)}")
  overall = bootstrap(metric, *arrays, samples=samples, confidence=confidence, seed=seed)
  by_category = {}
  for c in sorted(set(cats.tolist())):
    sel = cats == c
    by_category[c] = {"n": int(sel.sum()),
                      **bootstrap(metric, *(a[sel] for a in arrays), samples=samples,
                                  confidence=confidence, seed=seed)}
  return CompatReport(kind=kind, old=old, new=new, n=n, overall=overall,
                      by_category=by_category, confidence=confidence)
