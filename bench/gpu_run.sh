#!/usr/bin/env bash
# The one prepared device run for issue #3 (a session lent a GPU; a few minutes on an H200).
# Through the device tool, from the repo root:  run(command="bash bench/gpu_run.sh", timeout_s=480)
# The device image has jax (CUDA), flax, numpy, ml-dtypes: nothing to install. Results land in
# $OUT (gpu_check.txt, bench_kernels.txt); record them in docs/benchmarks.md with this command.
set -o pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/jaxadapt_gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
# 1. The compiled Triton kernels against the jnp specification (incl. gradients).
timeout 240 python3 -m bench.gpu_check 2>&1 | tee "$out/gpu_check.txt"
# 2. Pallas (auto) vs XLA on the workload; last line RESULT for the default path.
timeout 200 python3 -m bench.kernels --reps 50 2>&1 | tee "$out/bench_kernels.txt"
