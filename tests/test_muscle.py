"""MUSCLE metrics and loss (jaxadapt/muscle.py) against hand-made cases and numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt import muscle


def test_flip_rates_hand_made():
  # v1 right on 0,1,2; v2 right on 1,2,3,4 of 6 examples.
  old = np.array([1, 1, 1, 0, 0, 0], bool)
  new = np.array([0, 1, 1, 1, 1, 0], bool)
  r = muscle.flip_rates(old, new)
  assert r == {"accuracy_old": 0.5, "accuracy_new": 4 / 6, "nfr": 1 / 6, "pfr": 2 / 6}


def test_choice_flip_rates_nfr_mc_counts_changed_wrong_answers():
  y = np.array([0, 0, 0, 0, 0, 0])
  old = np.array([0, 1, 1, 2, 0, 1])  # right on 0 and 4
  new = np.array([1, 1, 2, 0, 0, 2])  # right on 3 and 4
  r = muscle.choice_flip_rates(old, new, y)
  # Negative flip: 0. Positive flip: 3. v2 wrong with another answer than v1: 0, 2, 5 (1 is
  # wrong the same way).
  assert r["nfr"] == 1 / 6 and r["pfr"] == 1 / 6
  assert r["nfr_mc"] == 3 / 6
  assert r["accuracy_old"] == r["accuracy_new"] == 2 / 6


def test_score_flip_rates_magnitudes():
  old = np.array([0.5, 1.0, 0.2, 0.3, 0.0])
  new = np.array([0.7, 0.5, 0.2, 0.0, 0.4])
  r = muscle.score_flip_rates(old, new)
  assert r["pfr"] == 2 / 5 and r["nfr"] == 2 / 5
  np.testing.assert_allclose(r["m_g"], (0.2 + 0.4) / 2)
  np.testing.assert_allclose(r["m_r"], (0.5 + 0.3) / 2)
  np.testing.assert_allclose([r["score_old"], r["score_new"]], [0.4, 0.36])
  none = muscle.score_flip_rates([1.0, 0.5], [1.0, 0.5])
  assert none["m_g"] == none["m_r"] == none["nfr"] == 0.0


def test_rouge1_and_exact_match():
  assert muscle.rouge1("the cat sat", "the cat sat") == 1.0
  # pred 4 words, ref 3, overlap 2 ("the" once: ref has one): p = 2/4, r = 2/3.
  np.testing.assert_allclose(muscle.rouge1("The the cat ran", "the cat sat"),
                             2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
  assert muscle.rouge1("dog", "cat") == 0.0
  assert muscle.rouge1("", "") == 1.0 and muscle.rouge1("", "x") == 0.0
  assert muscle.exact_match(" [sort] abc ", "[sort] abc") == 1.0
  assert muscle.exact_match("[sort] abd", "[sort] abc") == 0.0


def test_bootstrap_interval_brackets_value_and_matches_numpy():
  rng = np.random.default_rng(0)
  old = rng.random(400) < 0.7
  new = rng.random(400) < 0.8
  est = muscle.bootstrap(muscle.flip_rates, old, new, samples=300, seed=3)
  for k, e in est.items():
    assert e.low <= e.value <= e.high, k
  # The same resamples computed directly.
  r = np.random.default_rng(3)
  nfr = []
  for _ in range(300):
    idx = r.integers(0, 400, size=400)
    nfr.append((old[idx] & ~new[idx]).mean())
  np.testing.assert_allclose([est["nfr"].low, est["nfr"].high],
                             np.percentile(nfr, [2.5, 97.5]))
  # Wider at lower confidence? No: narrower.
  narrow = muscle.bootstrap(muscle.flip_rates, old, new, samples=300, seed=3, confidence=0.5)
  assert narrow["nfr"].high - narrow["nfr"].low < est["nfr"].high - est["nfr"].low


def test_mean_and_standard_error():
  m, se = muscle.mean_and_standard_error([1.0, 2.0, 4.0])
  assert m == pytest.approx(7 / 3)
  assert se == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))
  assert muscle.mean_and_standard_error([0.5]) == (0.5, 0.0)


@pytest.mark.parametrize("bad", [
    lambda: muscle.flip_rates([1, 0], [1]),
    lambda: muscle.flip_rates([], []),
    lambda: muscle.flip_rates([[1]], [[1]]),
    lambda: muscle.flip_rates([2, 0], [1, 0]),
    lambda: muscle.score_flip_rates([np.nan], [1.0]),
    lambda: muscle.bootstrap(muscle.flip_rates, [1], [1], confidence=1.5),
])
def test_bad_inputs_raise_clear_errors(bad):
  with pytest.raises(ValueError, match="example|confidence|booleans|finite"):
    bad()


def _numpy_compat_loss(zc, z1, z2, labels, t, mask, lam):
  """MUSCLE Eq. 1 written out token by token in numpy (float64)."""
  def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())
  def wrong_at(b, s):
    return int(np.argmax(zc[b, s]) != labels[b, s + 1])

  def answer_wrong(b, s):  # any wrong token in the run of answer positions around s
    valid = labels[b, 1:] != muscle.IGNORE
    lo, hi = s, s
    while lo > 0 and valid[lo - 1]:
      lo -= 1
    while hi + 1 < len(valid) and valid[hi + 1]:
      hi += 1
    return int(any(wrong_at(b, k) for k in range(lo, hi + 1)))

  total_kd, total_ce, n = 0.0, 0.0, 0
  for b in range(labels.shape[0]):
    for s in range(labels.shape[1] - 1):
      y = labels[b, s + 1]
      if y == muscle.IGNORE:
        continue
      n += 1
      m = {"muscle": wrong_at(b, s), "answer": answer_wrong(b, s), "old": 1, "new": 0}[mask]
      teacher = z1[b, s] if m else z2[b, s]
      log_p, log_q = log_softmax(teacher / t), log_softmax(zc[b, s] / t)
      total_kd += float(np.sum(np.exp(log_p) * (log_p - log_q)))
      total_ce += -float(log_softmax(zc[b, s])[y])
  return (1 - lam) * total_kd / n + lam * total_ce / n


@pytest.mark.parametrize("mask,lam", [("muscle", 0.0), ("old", 0.0), ("new", 0.0),
                                      ("muscle", 0.3), ("muscle", 1.0), ("answer", 0.0)])
def test_compat_loss_equals_numpy(mask, lam):
  rng = np.random.default_rng(1)
  b, s, v = 3, 7, 11
  zc, z1, z2 = (rng.normal(size=(b, s, v)) * 2 for _ in range(3))
  labels = rng.integers(0, v, size=(b, s))
  labels[:, :3] = muscle.IGNORE  # the prompt
  labels[1, -1] = muscle.IGNORE
  labels[2, 5] = muscle.IGNORE  # row 2 packs two answers
  # Make the student right at some answer positions so both branches of the mask occur.
  for (i, j) in [(0, 3), (0, 5), (2, 4)]:
    labels[i, j + 1] = int(np.argmax(zc[i, j]))
  loss, metrics = muscle.compat_loss(*(jnp.asarray(z, jnp.float32) for z in (zc, z1, z2)),
                                     jnp.asarray(labels), temperature=2.0, mask=mask,
                                     ce_weight=lam)
  np.testing.assert_allclose(float(loss), _numpy_compat_loss(zc, z1, z2, labels, 2.0, mask, lam),
                             rtol=1e-5)
  valid = labels[:, 1:] != muscle.IGNORE
  right = (np.argmax(zc[:, :-1], -1) == labels[:, 1:]) & valid
  np.testing.assert_allclose(float(metrics["student_acc"]), right.sum() / valid.sum(), rtol=1e-6)
  if mask != "answer":
    expect_old = {"muscle": 1 - right.sum() / valid.sum(), "old": 1.0, "new": 0.0}[mask]
    np.testing.assert_allclose(float(metrics["mask_old"]), expect_old, rtol=1e-6)


def test_answer_mask_spreads_over_each_answer():
  # Row: positions 0-1 prompt, 2-4 an answer (wrong at 3), 5 prompt, 6-7 an answer (right).
  valid = jnp.array([[0, 0, 1, 1, 1, 0, 1, 1]], bool)
  wrong = jnp.array([[0, 1, 0, 1, 0, 1, 0, 0]], bool)
  got = muscle._any_in_answer(wrong, valid)
  np.testing.assert_array_equal(np.asarray(got), [[0, 0, 1, 1, 1, 0, 0, 0]])


def test_mask_follows_the_students_argmax():
  # One answer token, vocab 3, label 2. The teachers differ: v1 says 0, v2 says 2.
  labels = jnp.array([[muscle.IGNORE, 2]])
  z1 = jnp.array([[[5.0, 0, 0], [0, 0, 0]]])
  z2 = jnp.array([[[0, 0, 5.0], [0, 0, 0]]])
  wrong = jnp.array([[[3.0, 0, 0], [0, 0, 0]]])   # argmax 0 != 2: distils from v1
  right = jnp.array([[[0, 0, 3.0], [0, 0, 0]]])   # argmax 2 == 2: distils from v2
  for student, teacher in ((wrong, z1), (right, z2)):
    got, m = muscle.compat_loss(student, z1, z2, labels)
    alone, _ = muscle.compat_loss(student, teacher, teacher, labels, mask="old")
    np.testing.assert_allclose(float(got), float(alone), rtol=1e-6)
  assert float(muscle.compat_loss(wrong, z1, z2, labels)[1]["mask_old"]) == 1.0
  assert float(muscle.compat_loss(right, z1, z2, labels)[1]["mask_old"]) == 0.0
  # The mask is not differentiated: the gradient equals that of the KL to the chosen teacher.
  g = jax.grad(lambda z: muscle.compat_loss(z, z1, z2, labels)[0])(wrong)
  g_ref = jax.grad(lambda z: muscle.compat_loss(z, z1, z1, labels, mask="old")[0])(wrong)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)


def test_compat_loss_refuses_mismatched_vocabularies():
  z = jnp.zeros((1, 4, 5))
  with pytest.raises(ValueError, match="share a tokenizer"):
    muscle.compat_loss(z, jnp.zeros((1, 4, 6)), z, jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="mask must be one of"):
    muscle.compat_loss(z, z, z, jnp.zeros((1, 4), jnp.int32), mask="both")


def test_compat_report_by_category():
  old = np.array([1, 1, 0, 1, 0, 1], bool)
  new = np.array([0, 1, 1, 1, 0, 0], bool)
  rouge_old, rouge_new = old.astype(float), new.astype(float)
  cats = ["a", "a", "a", "b", "b", "b"]
  rep = muscle.compat_report("generate", (old, new, rouge_old, rouge_new), cats, samples=50)
  assert rep.n == 6 and set(rep.by_category) == {"a", "b"}
  assert rep.overall["nfr"].value == 2 / 6
  assert rep.by_category["a"]["nfr"].value == 1 / 3
  assert rep.by_category["b"]["nfr"].value == 1 / 3
  assert rep.by_category["a"]["pfr"].value == 1 / 3 and rep.by_category["b"]["n"] == 3
  assert rep.overall["rouge1_nfr"].value == 2 / 6
  js = rep.to_json()
  assert js["by_category"]["a"]["nfr"]["value"] == 1 / 3
