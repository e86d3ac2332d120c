"""AGD on Stable Diffusion 2.1 (the paper's text-to-image setting), for a machine that holds it.

Command (stabilityai/stable-diffusion-2-1 as diffusers saves it; a prompt file, one caption per
line, e.g. a subset of COCO 2017 train captions, which the paper draws its prompts from):
  python -m train.agd collect --config agd_sd21 --pipeline /data/sd21 --prompts /data/coco.txt
  python -m train.agd train   --config agd_sd21 --pipeline /data/sd21 --prompts /data/coco.txt
  # multi-host: the same command on every host (see agd_dit_xl2), --data_parallel=<devices>
Sampling afterwards:
  pipe.generate("a photo of a cat", guidance_scale=7.5, guidance="agd",
                agd=ja.agd.load_agd("runs/agd_sd21/adapters/cross_attention"))

The cross-attention adapter on every cross-attention module of the U-Net (the paper's U-Net
default): queries from the block's hidden states, keys/values from [w, timestep, the 77 prompt
tokens] with positions. Trajectories store the prompt's id; the text states are written once per
prompt (`conditions.npy`). The forward-noised ablation needs real latents and is off. Sizes
(trajectories, steps, batch, w range) are ours, not restated from the paper.
Not run on this project's machines (CPU only): no numbers are claimed for it.
"""
from train.agd import AGDTrainConfig


def get_config() -> AGDTrainConfig:
  return AGDTrainConfig(
      pipeline="/data/sd21", base_config="", kinds=("cross_attention",),
      default_kind="cross_attention", ablation=False, hidden=320, heads=8, guidance_min=1.0, guidance_max=12.0, scheduler="ddim", num_steps=50,
      num_trajectories=10_000, shard_size=64, collect_batch=8, eval_guidance=(3.0, 7.5, 10.0,
                                                                             15.0),
      eval_trajectories=16, eval_samples=16, steps=20_000, batch_size=32, learning_rate=1e-4,
      warmup_steps=500, checkpoint_every=1000, log_every=50, data_parallel=1,
      out_dir="runs/agd_sd21")
