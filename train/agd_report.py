"""The AGD reproduction's evaluation and its page (`docs/agd.md`): what `train.agd` measures.

For each evaluation guidance scale w (`eval_guidance`; the last one outside the training range):
  * gap: the share of the eps_cond -> eps_cfg gap the adapted model closes on held-out CFG
    trajectories (`jaxadapt.agd.gap_recovered`: 1 - sum ||eps_A - eps_cfg|| / sum ||eps_c -
    eps_cfg||, per-example L2 norms);
  * samples from the same noise and labels for every row (no guidance, CFG, each AGD adapter):
    pixel RMSE to the CFG sample (on the [0, 1] intensity scale), the Fréchet distance to the
    held-out real digits in the features of the repo's digits classifier (Heusel et al. 2017),
    that classifier's accuracy on the samples for their label, network evaluations per sample
    and wall time per sample (medians of `timing_repeats` runs, every row of one w interleaved,
    after a compile run);
  * adapter parameters as a share of the base's.
References: Jensen & Sadat 2025 (AGD), Sec. 4 (the paper's DiT-XL/2 and SD 2.1 tables: FID, and
one network evaluation per step instead of two); Ho & Salimans 2022 Eq. 6 (CFG).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt import agd as agd_lib
from jaxadapt.diffusion import sampling
from jaxadapt.diffusion.pipeline import _agd_denoise, _dit_denoise, _resolve_scheduler
from jaxadapt.models import frozen as frozen_lib
from train.timing import median_ms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DOCS = os.path.join(REPO, "docs", "agd.md")
GAP_TARGET, FD_TARGET, TIME_TARGET = 0.70, 0.10, 0.55


def _predict(model, adapter, arrays, batch: int = 512) -> np.ndarray:
  """The adapted model's eps on every record of `arrays` (one forward pass each)."""
  @jax.jit
  def run(params, x, t, c, w):
    ctx = agd_lib.context(adapter.config, params, w)
    out = frozen_lib.apply(model.graphdef, model.params, "__call__", x, t, c, ctx=ctx)
    return out[:, :x.shape[1]]
  outs = []
  for i in range(0, len(arrays["t"]), batch):
    sl = slice(i, i + batch)
    outs.append(np.asarray(run(adapter.params, arrays["x"][sl], arrays["t"][sl],
                               arrays["cond"][sl], arrays["w"][sl])))
  return np.concatenate(outs)


def classifier(config):
  """The digits judge: trained once per out_dir, then loaded."""
  from train import digits
  path = os.path.join(config.out_dir, "classifier.safetensors")
  if os.path.exists(path):
    return digits.DigitsClassifier.load(path)
  clf = digits.train_classifier(seed=config.seed)
  if jax.process_index() == 0:
    clf.save(path)
  return clf


def is_digits(pipe) -> bool:
  """Whether the base makes 8x8 digits (the repo's judge can score its samples)."""
  from train import agd as train_agd
  return (getattr(pipe, "num_classes", None) == 10
          and tuple(train_agd.sample_shape(pipe)) == (1, 8, 8))


def evaluate(config, pipe, adapters: dict, held) -> dict:
  """Every number of the report (module docstring); `held`: the held-out trajectories.

  The Fréchet distance and the accuracy need the digits judge: for another base (DiT-XL/2,
  SD 2.1) they are left out, and the gap, RMSE and timings are measured alone.
  """
  from train import agd as train_agd
  from train import digits
  model = pipe.backbone
  base_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
  results = {"base_params": base_params,
             "params": {n: {"count": a.num_params, "fraction": a.fraction_of(model)}
                        for n, a in adapters.items()},
             "gap": {}, "samples": {}}
  arrays = held.arrays()
  for name, adapter in adapters.items():
    pred = _predict(model, adapter, arrays)
    results["gap"][name] = {}
    results.setdefault("gap_by_step", {})[name] = {}
    steps_t = np.unique(arrays["t"])[::-1]  # the sampler's timesteps, first step first
    for w in config.eval_guidance:
      m = np.isclose(arrays["w"], w)
      results["gap"][name][str(w)] = agd_lib.gap_recovered(pred[m], arrays["eps_cond"][m],
                                                           arrays["eps_cfg"][m])
      # where along the trajectory the error sits: the gap recovered at each sampler step
      results["gap_by_step"][name][str(w)] = [
          agd_lib.gap_recovered(pred[m & (arrays["t"] == t)],
                                arrays["eps_cond"][m & (arrays["t"] == t)],
                                arrays["eps_cfg"][m & (arrays["t"] == t)]) for t in steps_t]
    results["steps_t"] = [float(t) for t in steps_t]
  judge = is_digits(pipe)
  if judge:
    clf = classifier(config)
    real, _ = digits.load_digits("held_out")
    real_feats = clf.features(real)
  sched = _resolve_scheduler(config.scheduler, pipe.scheduler_config)
  n = config.eval_samples
  noise = np.random.default_rng([config.seed, 99]).standard_normal(
      (n,) + tuple(train_agd.sample_shape(pipe))).astype(np.float32)
  conds = train_agd.conditions(pipe, train_agd._prompts(config))
  ids = jnp.asarray(np.arange(n) % conds.count, jnp.int32)
  labels, null = conds.lookup(ids), conds.lookup(jnp.full_like(ids, conds.null))
  plain = jax.tree_util.Partial(_dit_denoise, model.graphdef, model.params, None)
  steps = config.num_steps

  def score(images, reference=None):
    out = {}
    if judge:
      out.update(fd=digits.frechet_distance(clf.features(images), real_feats),
                 accuracy=float(np.mean(clf.predict(images) == np.asarray(ids))))
    if reference is not None:  # RMSE on the [0, 1] intensity scale
      out["rmse_to_cfg"] = float(np.sqrt(np.mean(((images - reference) / 2) ** 2)))
    return out

  def sampler(fn, cond, uncond=None, w=None):
    return lambda: sampling.sample(fn, sched, noise, cond, uncond, w, steps, None)

  unguided = np.asarray(sampler(plain, labels)())
  samples_for_grid = {"no guidance": unguided}
  for w in config.eval_guidance:
    fns = {"no guidance": sampler(plain, labels),
           "cfg": sampler(plain, labels, null, jnp.float32(w))}
    for name, adapter in adapters.items():
      fn = jax.tree_util.Partial(_agd_denoise, model.graphdef, model.params, None,
                                 adapter.inserts())
      fns[name] = sampler(fn, {"c": labels, "w": jnp.full((n,), w, jnp.float32)})
    grids = {k: np.asarray(f()) for k, f in fns.items() if k != "no guidance"}
    ms = median_ms(fns, config.timing_repeats)  # interleaved: the machine's noise hits all alike
    cfg = grids["cfg"]
    row = {"cfg": {**score(cfg, cfg), "nfe": 2 * steps,
                   "seconds_per_sample": ms["cfg"] / 1e3 / n},
           "no guidance": {**score(unguided, cfg), "nfe": steps,
                           "seconds_per_sample": ms["no guidance"] / 1e3 / n,
                           "time_vs_cfg": ms["no guidance"] / ms["cfg"]}}
    for name in adapters:
      row[name] = {**score(grids[name], cfg), "nfe": steps,
                   "seconds_per_sample": ms[name] / 1e3 / n, "time_vs_cfg": ms[name] / ms["cfg"]}
    results["samples"][str(w)] = row
    samples_for_grid[str(w)] = grids
  results["grid"] = _save_grid(config, samples_for_grid, min(conds.count, 10)) if judge else None
  results["targets"] = targets(config, results)
  return results


def evaluate_derived(config, pipe, styled, adapter, held) -> dict:
  """The default adapter, trained on the base, on a checkpoint derived from it (the base with a
  style LoRA merged): the gap it recovers on the derived model's own CFG trajectories, and its
  samples against the derived model's CFG samples (same noise), with the mean pixel intensity
  that shows the style (bold strokes) is there."""
  from train import agd as train_agd
  arrays = held.arrays()
  pred = _predict(styled.backbone, adapter, arrays)
  out = {"gap": {}, "samples": {}}
  for w in config.eval_guidance:
    m = np.isclose(arrays["w"], w)
    out["gap"][str(w)] = agd_lib.gap_recovered(pred[m], arrays["eps_cond"][m],
                                               arrays["eps_cfg"][m])
  clf = classifier(config)
  sched = _resolve_scheduler(config.scheduler, pipe.scheduler_config)
  n = config.eval_samples
  noise = np.random.default_rng([config.seed, 99]).standard_normal(
      (n,) + tuple(train_agd.sample_shape(pipe))).astype(np.float32)
  ids = jnp.asarray(np.arange(n) % pipe.num_classes, jnp.int32)
  null = jnp.full_like(ids, pipe.num_classes)
  rows = {}
  for name, model in (("base", pipe.backbone), ("derived", styled.backbone)):
    plain = jax.tree_util.Partial(_dit_denoise, model.graphdef, model.params, None)
    agd_fn = jax.tree_util.Partial(_agd_denoise, model.graphdef, model.params, None,
                                   adapter.inserts())
    for w in config.eval_guidance:
      cfg = np.asarray(sampling.sample(plain, sched, noise, ids, null, jnp.float32(w),
                                       config.num_steps, None))
      agd = np.asarray(sampling.sample(agd_fn, sched, noise,
                                       {"c": ids, "w": jnp.full((n,), w, jnp.float32)}, None,
                                       None, config.num_steps, None))
      unguided = np.asarray(sampling.sample(plain, sched, noise, ids, None, None,
                                            config.num_steps, None))
      rows[(name, w)] = (cfg, agd)
      out["samples"][f"{name} {w}"] = {
          "unguided_rmse_to_cfg": float(np.sqrt(np.mean(((unguided - cfg) / 2) ** 2))),
          "cfg_intensity": float(np.mean(cfg)), "agd_intensity": float(np.mean(agd)),
          "rmse_to_cfg": float(np.sqrt(np.mean(((agd - cfg) / 2) ** 2))),
          "cfg_accuracy": float(np.mean(clf.predict(cfg) == np.asarray(ids))),
          "agd_accuracy": float(np.mean(clf.predict(agd) == np.asarray(ids)))}
  from jaxadapt.diffusion import images as images_lib
  w = config.eval_guidance[1 if len(config.eval_guidance) > 1 else 0]
  k = pipe.num_classes
  grid = np.concatenate([rows[("base", w)][0][:k], rows[("derived", w)][0][:k],
                         rows[("derived", w)][1][:k]])
  report = config.report or REPO_DOCS
  path = os.path.join(os.path.dirname(os.path.abspath(report)), "agd_style.png")
  if jax.process_index() == 0:
    images_lib.save_image_grid(images_lib.to_uint8(_upscale(grid)), path, cols=k)
  out["grid"], out["grid_w"] = path, w
  return out


def targets(config, results) -> dict:
  """The issue's targets on the default adapter, for w in [1.5, 5]: gap >= 70%, FD within 10%
  of CFG's, wall time <= 0.55x CFG's."""
  name = config.default_kind
  inside = [w for w in config.eval_guidance if config.guidance_min <= w <= config.guidance_max]
  out = {}
  for w in inside:
    s = results["samples"][str(w)]
    out[str(w)] = {
        "gap": results["gap"][name][str(w)] >= GAP_TARGET,
        "fd": s[name]["fd"] <= (1 + FD_TARGET) * s["cfg"]["fd"] if "fd" in s["cfg"] else None,
        "time": s[name]["time_vs_cfg"] <= TIME_TARGET}
  return out


def _upscale(images: np.ndarray, factor: int = 4) -> np.ndarray:
  return np.repeat(np.repeat(images, factor, axis=2), factor, axis=3)


def _save_grid(config, samples: dict, num_classes: int) -> str:
  """A PNG: for each evaluation w, rows CFG and each adapter (first `num_classes` samples, one
  per label, from the same noise), then the unguided row."""
  from jaxadapt.diffusion import images as images_lib
  rows = [samples["no guidance"][:num_classes]]
  for w in config.eval_guidance:
    for name in ["cfg"] + [k for k in samples[str(w)] if k != "cfg"]:
      rows.append(samples[str(w)][name][:num_classes])
  pix = images_lib.to_uint8(_upscale(np.concatenate(rows)))
  report = config.report or REPO_DOCS
  path = os.path.join(os.path.dirname(os.path.abspath(report)), "agd_samples.png")
  if jax.process_index() == 0:
    images_lib.save_image_grid(pix, path, cols=num_classes)
  return path


def _fmt(v, pct=False):
  return f"{100 * v:.1f}%" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _reading(config, results) -> list:
  """Statements the tables support, computed from them (so a rerun keeps them true)."""
  inside = [str(w) for w in config.eval_guidance
            if config.guidance_min <= w <= config.guidance_max]
  outside = [str(w) for w in config.eval_guidance if str(w) not in inside]
  gap = results["gap"]
  mean = {n: float(np.mean([gap[n][w] for w in inside])) for n in gap}
  best = max(mean, key=mean.get)
  out = ["", "## What the tables say", "",
         f"- Best adapter on the held-out gap inside the training range: `{best}` (mean "
         f"{100 * mean[best]:.1f}%; " + ", ".join(f"`{n}` {100 * v:.1f}%" for n, v in
                                                  mean.items() if n != best) + ")."]
  ablation = f"{config.default_kind}_forward_noised"
  if ablation in gap:
    wins = [w for w in inside if gap[config.default_kind][w] > gap[ablation][w]]
    out.append(f"- Trained on CFG trajectories vs on forward-noised data (the paper's ablation):"
               f" the trajectories win at {len(wins)} of {len(inside)} in-range w ("
               + ", ".join(f"w={w}: {100 * gap[config.default_kind][w]:.1f}% vs "
                           f"{100 * gap[ablation][w]:.1f}%" for w in inside) + ").")
  for w in outside:
    out.append(f"- Outside the training range (w={w}) every adapter falls back: gap "
               + ", ".join(f"`{n}` {100 * gap[n][w]:.1f}%" for n in gap) + ".")
  return out


def _deviations(config, pipe, results) -> list:
  """What this run does differently from the paper, and why (the page's own section)."""
  share = results["params"].get(config.default_kind, {}).get("fraction", 0.0)
  out = ["", "## Deviations from the paper", ""]
  if is_digits(pipe):
    out += [
        f"- The base is a {results['base_params'] / 1e6:.2f}M-parameter pixel-space DiT on 8x8 "
        "digits (trained here in minutes), not DiT-XL/2 on ImageNet latents or SD 2.1; FID is "
        "replaced by the Fréchet distance in the repo's digits classifier's features against "
        f"the 355 held-out digits ({config.eval_samples} samples per row).",
    ]
  out += [
      f"- The default adapter is `{config.default_kind}`"
      + (" (ours): on this base the paper's offset adapter recovers far less of the gap (the "
         "table above), as a per-sample offset cannot follow a correction that differs per "
         "token." if config.default_kind == "token" else ".")
      + f" Its width {config.hidden} is {100 * share:.1f}% of this small base; the paper's ~2% "
      "is of DiT-XL/2 and SD (this repo's `agd_dit_xl2` / `agd_sd21` configs: 1.7-2.7%).",
  ]
  if config.scale_by_guidance:
    out.append("- Every adapter output is multiplied by (w - 1) (`scale_by_guidance`, ours): "
               "the adapted model equals the base at w = 1, as CFG does.")
  out += [
      f"- Trajectories: {config.scheduler.upper()} with {config.num_steps} steps, w ~ "
      f"U[{config.guidance_min:g}, {config.guidance_max:g}], {config.num_trajectories} "
      f"trajectories; adapters: {config.steps} AdamW steps of {config.batch_size} records at "
      f"{config.learning_rate:g} (warm-up {config.warmup_steps}, cosine). The paper's counts "
      "for its large models are not restated.",
      "- The gap-recovered measure is ours (per-example L2 norms, not squared); wall times are "
      "on a CPU, where the doubled CFG batch costs about twice the single one.",
  ]
  return out


def write_report(config, pipe, adapters, results, seconds, command: str) -> str:
  """Writes the results page (config.report, default docs/agd.md); returns its path."""
  path = config.report or REPO_DOCS
  ws = [str(w) for w in config.eval_guidance]
  outside = [w for w in config.eval_guidance
             if not config.guidance_min <= w <= config.guidance_max]
  names = list(adapters)
  rows = ["no guidance", "cfg"] + names
  label = lambda r: {"cfg": "CFG", "no guidance": "no guidance"}.get(r, f"AGD {r}")  # noqa: E731
  base = ("a small class-conditional DiT trained in the repo on scikit-learn's 8x8 digits "
          "(label dropout, `train/digits.py`)" if is_digits(pipe)
          else f"the frozen base `{config.pipeline_dir()}`")
  lines = [
      "# AGD: adapter guidance distillation" + (" on scikit-learn's digits" if is_digits(pipe)
                                                else ""),
      "",
      "Jensen & Sadat 2025, \"Efficient Distillation of Classifier-Free Guidance using "
      f"Adapters\". The base: {base}; CFG trajectories collected with w ~ "
      f"U[{config.guidance_min:g}, {config.guidance_max:g}] (Algorithm 1); adapters trained on "
      "them with the base frozen (Algorithm 2); evaluated on held-out trajectories and on "
      "samples from the same noise.",
      "",
      f"Command: `{command}` ({seconds.get('total', 0) / 60:.1f} min on this machine, load "
      f"average {seconds.get('load_start', 0):.1f} -> {seconds.get('load_end', 0):.1f}; "
      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()
                  if isinstance(v, (int, float))
                  and k not in ("total", "load_start", "load_end")) + ")"
      + (f"; the evaluation re-run with `{seconds['reevaluated_with']}`."
         if "reevaluated_with" in seconds else "."),
      "",
      f"Sampler: {config.scheduler}, {config.num_steps} steps; {config.num_trajectories} "
      f"training trajectories ({config.num_trajectories * config.num_steps} records); "
      f"{config.eval_trajectories} held-out trajectories per w; {config.eval_samples} samples "
      f"per w and row; adapters: {config.steps} steps of batch {config.batch_size}, width "
      f"{config.hidden}. w = {', '.join(f'{w:g}' for w in outside)} is outside the training "
      "range.",
      "",
      "## Share of the eps_cond -> eps_cfg gap recovered (held-out trajectories)",
      "",
      "| adapter | params (share of base) | " + " | ".join(f"w={w}" for w in ws) + " |",
      "|---|---|" + "---|" * len(ws),
  ]
  for n in names:
    p = results["params"][n]
    lines.append(f"| {n} | {p['count']} ({100 * p['fraction']:.2f}%) | "
                 + " | ".join(_fmt(results["gap"][n][w], True) for w in ws) + " |")
  d = config.default_kind
  if d in results.get("gap_by_step", {}):
    steps_t = results["steps_t"]
    pick = sorted({0, len(steps_t) // 4, len(steps_t) // 2, 3 * len(steps_t) // 4,
                   len(steps_t) - 1})
    lines += ["", f"Gap recovered by the default adapter ({d}) along the trajectory (sampler "
              "step: timestep):", "",
              "| w | " + " | ".join(f"step {i + 1}: t={steps_t[i]:g}" for i in pick) + " |",
              "|---|" + "---|" * len(pick)]
    for w in ws:
      per = results["gap_by_step"][d][w]
      lines.append(f"| {w} | " + " | ".join(_fmt(per[i], True) for i in pick) + " |")
  for metric, title, pct in (("fd", "Fréchet distance to held-out digits (classifier features; "
                                    "lower is better)", False),
                             ("accuracy", "Classifier accuracy on the samples for their label",
                              True),
                             ("rmse_to_cfg", "Pixel RMSE to the CFG sample from the same noise "
                                             "([0, 1] scale)", False),
                             ("seconds_per_sample", "Wall time per sample (ms; median of "
                                                    f"{config.timing_repeats} runs)", False)):
    if metric not in results["samples"][ws[0]]["cfg"]:
      continue  # no judge for this base
    lines += ["", f"## {title}", "", "| row | NFE | " + " | ".join(f"w={w}" for w in ws) + " |",
              "|---|---|" + "---|" * len(ws)]
    for r in rows:
      cells = []
      for w in ws:
        v = results["samples"][w][r][metric]
        cells.append(f"{1000 * v:.2f}" if metric == "seconds_per_sample" else _fmt(v, pct))
      lines.append(f"| {label(r)} | {results['samples'][ws[0]][r]['nfe']} | "
                   + " | ".join(cells) + " |")
  lines += _reading(config, results)
  lines += _deviations(config, pipe, results)
  lines += ["", "## Targets (default adapter: " + config.default_kind + ")", "",
            "| w | gap >= 70% | FD within 10% of CFG | time <= 0.55x CFG |", "|---|---|---|---|"]
  for w, t in results["targets"].items():
    lines.append(f"| {w} | " + " | ".join(
        "n/a" if t[k] is None else "met" if t[k] else "**not met**"
        for k in ("gap", "fd", "time")) + " |")
  if results.get("style"):
    st = results["style"]
    lines += ["", "## The adapter on a derived checkpoint (the base + a bold-strokes style LoRA "
              "merged)", "",
              f"The default adapter ({config.default_kind}), trained on the base only, attached "
              f"to the base with a rank-{config.style_rank} style LoRA merged in "
              f"({config.style_steps} steps on bold digits). Gap recovered on the derived "
              "model's own held-out CFG trajectories, and samples from the same noise:", "",
              "| w | gap (derived) | gap (base) | RMSE to CFG, derived: AGD / unguided | RMSE "
              "AGD-CFG base | mean intensity CFG base / derived / AGD derived | accuracy CFG / "
              "AGD (derived) |",
              "|---|---|---|---|---|---|---|"]
    for w in ws:
      b, d = st["samples"][f"base {w}"], st["samples"][f"derived {w}"]
      lines.append(
          f"| {w} | {_fmt(st['gap'][w], True)} | {_fmt(results['gap'][config.default_kind][w], True)}"
          f" | {d['rmse_to_cfg']:.3f} / {d['unguided_rmse_to_cfg']:.3f} | {b['rmse_to_cfg']:.3f}"
          f" | {b['cfg_intensity']:.3f} / "
          f"{d['cfg_intensity']:.3f} / {d['agd_intensity']:.3f} | "
          f"{_fmt(d['cfg_accuracy'], True)} / {_fmt(d['agd_accuracy'], True)} |")
    rel = os.path.relpath(st["grid"], os.path.dirname(os.path.abspath(path)))
    lines += ["", f"![derived]({rel})", "", f"Rows (w = {st['grid_w']:g}): CFG on the base, CFG on "
              "the derived checkpoint, AGD on the derived checkpoint (same noise).", ""]
  if results.get("grid"):
    rel = os.path.relpath(results["grid"], os.path.dirname(os.path.abspath(path)))
    lines += ["", f"![samples]({rel})", "",
              "Grid: the first row is unguided; then, for each w, CFG and each adapter (one "
              "sample per label, the same noise in every row).", ""]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
