"""Pre-training of the tiny byte-level Llama from scratch on the synthetic corpus.

Command (no downloads, no arguments needed):
  python -m train.pretrain                     # same as --config pretrain_tiny
  python -m train.pretrain --steps 50 --out_dir /tmp/run --config.data_parallel=2

Takes about 15 s on 2 CPU cores (600 steps of a 2-layer, 64-wide Llama, batch 16 x 64 bytes,
every parameter trained: 0.1M parameters, AdamW with decay on the matrices).

Expect: the loss falls from 5.53 (~ln 256, byte-level) to ~0.6 at the end (mean of the last 20
steps: 0.60), far below the corpus' bigram entropy (2.1 nats) and the 1.5 that `train.lora`
reaches on the random base; `runs/pretrain_tiny/` then holds `metrics.jsonl` (step, loss,
learning rate), `checkpoints/` (orbax) and `model/` (a Hugging Face dir:
`jaxadapt.load_model("runs/pretrain_tiny/model")`, or transformers' `AutoModelForCausalLM`).
Kill it and rerun the same command: it resumes from the last checkpoint and the loss curve
continues identically.

To continue training a real model: `--model_dir HF_DIR --data corpus.txt` (tokenized with the
model dir's tokenizer when it has one, else as UTF-8 bytes, which needs vocab_size >= 256).
"""
from train.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
  return PretrainConfig(
      model_dir=None, data=None, out_dir="runs/pretrain_tiny", steps=600, batch_size=16,
      seq_len=64, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1, checkpoint_every=100,
      log_every=10)
