"""AGD sampling (Jensen & Sadat 2025): one network pass per step against CFG's two.

  python bench/agd.py                       # the digits reproduction's base and adapters
  python bench/agd.py --pipeline DIR --adapters DIR   # any DiT pipeline and `load_agd` dirs
  python bench/agd.py --quick               # a random digits-sized DiT, zero adapters (seconds)

For each batch size it times a whole sampling run (`--steps` DDIM steps) without guidance, with
CFG (the doubled batch: two network evaluations per step) and with each AGD adapter (one
evaluation per step, the adapters inside it), every row interleaved in one process (medians),
and prints ms per sample and each row's time relative to CFG. The issue's target: AGD <= 0.55x
CFG. Prints one line per batch size and a RESULT line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxadapt import agd as agd_lib  # noqa: E402
from jaxadapt.diffusion import sampling  # noqa: E402
from jaxadapt.diffusion.pipeline import (DiTPipeline, _agd_denoise, _dit_denoise,  # noqa: E402
                                         _resolve_scheduler)
from train.timing import median_ms  # noqa: E402

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs",
                   "agd_digits")


def _quick():
  """A random digits-sized pipeline (6 blocks, width 64) and zero adapters of every kind."""
  from train import digits
  from train.configs.digits_dit import get_config
  cfg = get_config()
  model = digits.init_dit(cfg.model_config(), 0)
  pipe = DiTPipeline("random", model, None, cfg.scheduler_config(), {})
  return pipe, {k: agd_lib.init_agd(model, kind=k, hidden=32) for k in agd_lib.KINDS}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--pipeline", default=os.path.join(RUN, "base", "pipeline"))
  ap.add_argument("--adapters", default=os.path.join(RUN, "adapters"),
                  help="a dir of `load_agd` dirs (one per adapter)")
  ap.add_argument("--batches", default="1,64,500")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  if args.quick or not os.path.isdir(args.pipeline):
    if not args.quick:
      print(f"no pipeline at {args.pipeline}: timing a random digits-sized DiT (--quick)")
    pipe, adapters = _quick()
    batches = [1, 64] if args.quick else [int(b) for b in args.batches.split(",")]
  else:
    from jaxadapt.diffusion.pipeline import load_pipeline
    pipe = load_pipeline(args.pipeline)
    adapters = {name: agd_lib.load_agd(os.path.join(args.adapters, name), pipe.transformer)
                for name in sorted(os.listdir(args.adapters))}
    batches = [int(b) for b in args.batches.split(",")]
  model = pipe.transformer
  sched = _resolve_scheduler("ddim", pipe.scheduler_config)
  c = model.config
  plain = jax.tree_util.Partial(_dit_denoise, model.graphdef, model.params, None)
  worst = 0.0
  for b in batches:
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(
        (b, c.in_channels, c.sample_size, c.sample_size)), jnp.float32)
    labels = jnp.asarray(np.arange(b) % pipe.num_classes, jnp.int32)
    null = jnp.full_like(labels, pipe.num_classes)
    w = jnp.full((b,), 3.0, jnp.float32)
    run = lambda fn, cond, unc=None, s=None: (  # noqa: E731
        lambda: sampling.sample(fn, sched, noise, cond, unc, s, args.steps, None))
    fns = {"unguided": run(plain, labels), "cfg": run(plain, labels, null, jnp.float32(3.0))}
    for name, a in adapters.items():
      fn = jax.tree_util.Partial(_agd_denoise, model.graphdef, model.params, None, a.inserts())
      fns[f"agd_{name}"] = run(fn, {"c": labels, "w": w})
    ms = median_ms(fns, args.repeats)
    ratios = {k: v / ms["cfg"] for k, v in ms.items()}
    worst = max(worst, max(v for k, v in ratios.items() if k.startswith("agd_")))
    print(f"batch {b:4d}: " + "  ".join(f"{k} {v / b:.3f} ms/sample ({ratios[k]:.2f}x cfg)"
                                        for k, v in ms.items()), flush=True)
  print(f"RESULT worst_agd_vs_cfg={worst:.2f} target<=0.55 "
        f"{'met' if worst <= 0.55 else 'NOT met'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
