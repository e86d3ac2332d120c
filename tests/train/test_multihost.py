"""Two processes (jax.distributed over loopback, gloo collectives) train like one process.

`python -m train.lora` is launched twice with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, each process with 4 CPU devices, on a (data=4, model=2) mesh spanning both; the
losses and the exported adapter equal an 8-device single-process run of the same config.
"""
import dataclasses
import json

import numpy as np

import jaxadapt as ja
from train import lora as train_lora
from train.configs.lora_tiny import get_config

from _processes import run_two_processes

FLAGS = dict(steps=4, batch_size=8, seq_len=32, synthetic_docs=300, warmup_steps=1,
             checkpoint_every=2, log_every=1, data_parallel=4, model_parallel=2)


def test_two_processes_equal_one(tmp_path):
  out = tmp_path / "multi"
  argv = [f"--{k}={v}" for k, v in FLAGS.items()] + ["--progress=false", f"--out_dir={out}"]
  run_two_processes("train.lora", argv, tmp_path)
  with open(out / "metrics.jsonl") as f:
    multi = [json.loads(line)["loss"] for line in f]

  single = train_lora.train(dataclasses.replace(get_config(), out_dir=str(tmp_path / "single"),
                                                progress=False, **FLAGS))
  np.testing.assert_allclose(multi, single.losses, atol=1e-5, rtol=0)
  exported = ja.load_adapter(str(out / "adapter"))
  for path, w in single.adapter.weights.items():
    for leaf in ("a", "b"):
      np.testing.assert_allclose(np.asarray(exported.weights[path][leaf]), np.asarray(w[leaf]),
                                 atol=1e-5, rtol=0)
  assert multi[-1] < multi[0]
