"""jaxadapt's TransFace ViT against a torch reference with TransFace's parameter names."""
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from jaxadapt.models.face_vit import (FaceEncoder, FaceViT, FaceViTConfig, forward,
                                      load_face_encoder, save_face_encoder)

TINY = dict(img_size=18, patch_size=3, embed_dim=32, depth=2, num_heads=4, num_features=16)


# ----------------------------------------------------------------------------- torch reference
# Written from the TransFace paper / model description: module names are the checkpoint's.

class _Attn(nn.Module):
  def __init__(self, d, heads, qkv_bias):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
    self.proj = nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    w = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
    return self.proj((w @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.ReLU6(), nn.Linear(hidden, d)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
  def __init__(self, d, heads, qkv_bias):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn, self.mlp = _Attn(d, heads, qkv_bias), _Mlp(d, 4 * d)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
  def __init__(self, p, d):
    super().__init__()
    self.proj = nn.Conv2d(3, d, kernel_size=p, stride=p)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class RefTransFace(nn.Module):
  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_features,
               qkv_bias=False):
    super().__init__()
    n, d = (img_size // patch_size) ** 2, embed_dim
    self.n, self.d = n, d
    self.patch_embed = _PatchEmbed(patch_size, d)
    self.pos_embed = nn.Parameter(torch.zeros(1, n, d))
    self.blocks = nn.ModuleList([_Block(d, num_heads, qkv_bias) for _ in range(depth)])
    self.norm = nn.LayerNorm(d)
    self.feature = nn.Sequential(nn.Linear(n * d, d, bias=False), nn.BatchNorm1d(d, eps=2e-5),
                                 nn.Linear(d, num_features, bias=False),
                                 nn.BatchNorm1d(num_features, eps=2e-5))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
    self.senet = nn.Sequential(nn.Linear(n * d, n, bias=False), nn.ReLU(),
                               nn.Linear(n, n, bias=False), nn.Sigmoid())

  def tokens(self, x):
    x = self.patch_embed(x) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)

  def forward(self, x):
    t = self.tokens(x)
    w = self.senet(t.reshape(len(t), -1))  # one weight per patch
    return self.feature((t * w[:, :, None]).reshape(len(t), -1))


def make_ref(seed=0, **overrides):
  torch.manual_seed(seed)
  model = RefTransFace(**{**TINY, **overrides})
  with torch.no_grad():  # every tensor random (norm weights near 1, BN stats non-trivial)
    for name, p in model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        p.fill_(1234)
      elif name.endswith("running_var"):
        p.copy_(0.5 + torch.rand_like(p))
      elif p.ndim == 1 and ("norm" in name or name.startswith("feature")) and "weight" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        fan_in = p[0].numel() if p.ndim >= 2 else 1
        p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else fan_in ** -0.5))
  return model.eval()


def _images(seed=0, b=3, size=18):
  g = torch.Generator().manual_seed(seed)
  return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  d = tmp_path_factory.mktemp("face")
  model = make_ref()
  path = d / "transface.pt"
  torch.save(model.state_dict(), path)
  return path, model


def test_tokens_and_embedding_equal_torch(ref):
  path, model = ref
  enc = load_face_encoder(path, num_heads=4)
  assert enc.config == FaceViTConfig(**TINY)  # inferred from the shapes (+ num_heads)
  x = _images()
  with torch.no_grad():
    want_tokens, want_emb = model.tokens(x).numpy(), model(x).numpy()
  tokens, emb = np.asarray(enc(x.numpy())), np.asarray(enc.embed(x.numpy()))
  assert tokens.shape == (3, 36, 32) and emb.shape == (3, 16)
  assert np.abs(want_tokens).max() > 0.5 and np.abs(want_emb).max() > 0.5  # non-trivial scale
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-5, rtol=0)
  np.testing.assert_allclose(emb, want_emb, atol=1e-5, rtol=0)
  # the pure forward, inside a user's jit, is the same function
  jitted = jax.jit(forward, static_argnums=0)(enc.graphdef, enc.params, x.numpy())
  np.testing.assert_allclose(np.asarray(jitted), want_tokens, atol=1e-5, rtol=0)
  # the senet weighting matters: the embedding without it differs
  with torch.no_grad():
    plain = model.feature(model.tokens(x).reshape(3, -1)).numpy()
  assert np.abs(plain - want_emb).max() > 1e-2


def test_qkv_bias_and_prefixed_checkpoint(tmp_path):
  model = make_ref(seed=1, qkv_bias=True)
  path = tmp_path / "wrapped.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
  enc = load_face_encoder(path, num_heads=4, key="state_dict", strip_prefix="module.")
  assert enc.config.qkv_bias
  x = _images(seed=2, b=2)
  with torch.no_grad():
    want = model.tokens(x).numpy()
  np.testing.assert_allclose(np.asarray(enc(x.numpy())), want, atol=1e-5, rtol=0)


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
  """TransFace's 112 / patch 9: the conv floors to 12 patches a side, the last pixels unread."""
  model = make_ref(seed=3, img_size=20)  # 20 // 3 = 6: the same 36 tokens as 18
  path = tmp_path / "t.pt"
  torch.save(model.state_dict(), path)
  config = FaceViTConfig(**{**TINY, "img_size": 20})
  enc = load_face_encoder(path, config=config)
  x = _images(seed=4, b=2, size=20)
  with torch.no_grad():
    want_tokens, want_emb = model.tokens(x).numpy(), model(x).numpy()
  np.testing.assert_allclose(np.asarray(enc(x.numpy())), want_tokens, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(enc.embed(x.numpy())), want_emb, atol=1e-5, rtol=0)
  # inferred from the shapes alone, a 6x6 grid of patch 3 is an 18-pixel image
  assert load_face_encoder(path, num_heads=4).config.img_size == 18


def test_save_load_round_trip_bitwise(ref, tmp_path):
  path, model = ref
  enc = load_face_encoder(path, num_heads=4)
  save_face_encoder(enc, tmp_path / "saved")
  cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
  assert cfg["num_heads"] == 4 and cfg["architecture"] == "TransFaceViT"
  back = load_face_encoder(tmp_path / "saved")
  assert back.config == enc.config
  a, b = jax.tree_util.tree_leaves_with_path(enc.params), jax.tree_util.tree_leaves(back.params)
  # every tensor of the state dict but the BatchNorms' num_batches_tracked counters: 40
  assert len(a) == len(b) == len(model.state_dict()) - 2 == 40
  for (kp, x), y in zip(a, b):
    assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes(), kp
  # the safetensors file alone loads too (config inferred, num_heads given)
  alone = load_face_encoder(tmp_path / "saved" / "face_encoder.safetensors", num_heads=4)
  assert alone.config == enc.config


def test_bad_checkpoints_refused_by_name(ref, tmp_path):
  _, model = ref
  sd = dict(model.state_dict())
  extra = tmp_path / "extra.pt"
  torch.save({**sd, "head.weight": torch.zeros(3, 3)}, extra)
  with pytest.raises(ValueError, match=r"unexpected tensors \['head.weight'\]"):
    load_face_encoder(extra, num_heads=4)
  missing = tmp_path / "missing.pt"
  torch.save({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, missing)
  with pytest.raises(ValueError, match=r"missing tensors \['blocks.1.mlp.fc2.bias'\]"):
    load_face_encoder(missing, num_heads=4)
  wrong = tmp_path / "wrong.pt"
  torch.save({**sd, "blocks.0.attn.proj.weight": torch.zeros(32, 31)}, wrong)
  with pytest.raises(ValueError, match=r"blocks.0.attn.proj.weight has shape \(32, 31\), "
                                       r"expected \(32, 32\)"):
    load_face_encoder(wrong, num_heads=4)
  with pytest.raises(ValueError, match="embed_dim 32 is not divisible by num_heads 5"):
    load_face_encoder(ref[0], num_heads=5)
  with pytest.raises(ValueError, match="img_size 2 is smaller than patch_size 3"):
    FaceViTConfig(img_size=2, patch_size=3)
  enc = load_face_encoder(ref[0], num_heads=4)
  with pytest.raises(ValueError, match=r"images must be \[batch, 3, 18, 18\].*got shape "
                                       r"\(2, 3, 16, 16\)"):
    enc(np.zeros((2, 3, 16, 16), np.float32))


def test_full_size_builds_abstractly():
  c = FaceViTConfig()
  assert c.num_patches == 144  # 112 // 9 = 12 a side
  assert FaceViTConfig.from_tensors({"pos_embed": (1, 144, 512),
                                     "patch_embed.proj.weight": (512, 3, 9, 9),
                                     "blocks.0.mlp.fc1.weight": (2048, 512),
                                     "blocks.11.mlp.fc1.weight": (2048, 512),
                                     "feature.2.weight": (512, 512)}) == c
  module = nnx.eval_shape(lambda: FaceViT(c, rngs=nnx.Rngs(0)))
  tokens = jax.eval_shape(lambda m, x: m(x), module,
                          jax.ShapeDtypeStruct((2, 3, 112, 112), np.float32))
  assert tokens.shape == (2, 144, 512)
  emb = jax.eval_shape(lambda m, x: m.embed(x), module,
                       jax.ShapeDtypeStruct((2, 3, 112, 112), np.float32))
  assert emb.shape == (2, 512)
  n, d, p, e, h = 144, 512, 9, 512, 2048
  block = 2 * d + d * 3 * d + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
  count = (3 * p * p * d + d      # patch_embed.proj
           + n * d + d            # pos_embed, mask_token
           + 12 * block           # blocks
           + 2 * d                # norm
           + n * d * n + n * n    # senet.0, senet.2
           + n * d * d + 4 * d    # feature.0, feature.1 (weight, bias, running mean / var)
           + d * e + 4 * e)       # feature.2, feature.3
  assert count == 86_662_912
  state = nnx.state(module)
  assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == count
  assert sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.BatchStat))) == 4 * d


def test_random_encoder_without_head():
  enc = FaceEncoder.random(FaceViTConfig(**{**TINY, "depth": 1, "num_features": 0}), seed=0)
  assert "feature" not in enc.params and "senet" not in enc.params
  x = np.asarray(_images(b=2))
  t = np.asarray(enc(x))
  assert t.shape == (2, 36, 32)
  # the final LayerNorm (weight 1, bias 0 at init): each token has mean 0, variance 1
  np.testing.assert_allclose(t.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(t.var(-1), 1, atol=1e-3)
  with pytest.raises(ValueError, match="no identity head"):
    enc.embed(x)
