"""LoRA on a tiny random Llama with the synthetic corpus: the embedded default of `train.lora`.

Command (no downloads, no arguments needed):
  python -m train.lora                      # same as --config lora_tiny
  python -m train.lora --steps 50 --out_dir /tmp/run --config.data_parallel=2

Takes about 10-15 s on 2 CPU cores (300 steps of a 2-layer, 64-wide Llama, batch 16 x 64 bytes,
LoRA r=16 on every linear layer incl. lm_head: the random base's own head is too weak to move).

Expect: the loss falls from 5.53 (~ln 256, byte-level) to ~1.5 at the end (mean of the last 20
steps: 1.53), below the corpus' bigram entropy (2.1 nats), so the adapter has learnt the line
patterns; `runs/lora_tiny/` then holds `metrics.jsonl` (step, loss, learning rate),
`checkpoints/` (orbax) and `adapter/` (a PEFT LoRA dir). Kill it and rerun the same command:
it resumes from the last checkpoint and the loss curve continues identically.

To fine-tune a real model: `--model_dir HF_DIR --data corpus.txt` (tokenized with the model dir's
tokenizer when it has one, else as UTF-8 bytes, which needs vocab_size >= 256).
"""
from train.lora import ALL_LINEAR_AND_HEAD, TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model_dir=None, data=None, out_dir="runs/lora_tiny", steps=300, batch_size=16, seq_len=64,
      learning_rate=3e-3, warmup_steps=20, lora_r=16, lora_alpha=32.0,
      target_modules=ALL_LINEAR_AND_HEAD, checkpoint_every=100, log_every=10)
