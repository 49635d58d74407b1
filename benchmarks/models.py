"""Flax (linen) models of the benchmarks: an MLP, LayerNorm ResNets, a BatchNorm ResNet and a
byte-level transformer language model.

The MLP and the LayerNorm ResNet are pure functions ``apply(params, x) -> logits``: the
per-example outputs the K controller differentiates do not depend on the rest of the batch.
:class:`BNResNet` is the ResNet users train (BatchNorm, ReLU); trained in train mode, its outputs
depend on the batch, and :mod:`benchmarks.tasks` evaluates it on population statistics.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu, "gelu": nn.gelu, "erf": jax.scipy.special.erf, "tanh": jnp.tanh,
}


class MLP(nn.Module):
  """Fully connected net: ``depth`` hidden layers of ``width``, then ``num_classes`` outputs."""

  width: int = 256
  depth: int = 2
  num_classes: int = 10
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    x = x.reshape(x.shape[0], -1)
    for _ in range(self.depth):
      x = act(nn.Dense(self.width)(x))
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=1, use_bias=False)(x)
    y = nn.gelu(nn.LayerNorm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = nn.LayerNorm()(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x)
      residual = nn.LayerNorm()(residual)
    return nn.gelu(y + residual)


class ResNet(nn.Module):
  """CIFAR ResNet (3x3 stem, no max-pool) with LayerNorm over channels and GELU.

  ``ResNet(width=64, blocks=(2, 2, 2, 2))`` is ResNet-18 (11.2M parameters).
  """

  width: int = 64
  blocks: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.gelu(nn.LayerNorm()(x))
    for stage, n in enumerate(self.blocks):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        x = BasicBlock(self.width * 2**stage, stride)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class PreActBlock(nn.Module):
  """Pre-activation residual block (LayerNorm, GELU, 3x3 conv, twice)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.LayerNorm()(x))
    residual = x
    if x.shape[-1] != self.features or self.stride != 1:
      residual = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(y)
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=1, use_bias=False)(y)
    y = nn.gelu(nn.LayerNorm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    return y + residual


class PreActResNet(nn.Module):
  """Small pre-activation ResNet (LayerNorm, GELU): a 3x3 stem, one block per width (stride 2
  where the width grows), global average pooling, a dense head."""

  widths: Sequence[int] = (32, 64, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)(x)
    for i, w in enumerate(self.widths):
      x = PreActBlock(w, 2 if i > 0 and w != self.widths[i - 1] else 1)(x)
    x = nn.gelu(nn.LayerNorm()(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class BNBasicBlock(nn.Module):
  features: int
  stride: int = 1
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)
    residual = x
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=1, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = norm()(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x)
      residual = norm()(residual)
    return nn.relu(y + residual)


class BNResNet(nn.Module):
  """CIFAR ResNet (3x3 stem, no max-pool) with BatchNorm and ReLU, as users train it.

  ``BNResNet(width=64, blocks=(2, 2, 2, 2))`` is ResNet-18. ``bn_momentum`` is the running
  averages' (PyTorch's 0.9; 0 makes the running statistics those of the last batch).
  """

  width: int = 64
  blocks: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    x = nn.relu(x)
    for stage, n in enumerate(self.blocks):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        x = BNBasicBlock(self.width * 2**stage, stride, self.bn_momentum)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TransformerLM(nn.Module):
  """Causal byte-level transformer: token and learned position embeddings, ``depth`` pre-LN
  blocks (multi-head self-attention, a GELU MLP of 4× width), a final LayerNorm and an untied
  readout; ``(B, T)`` bytes -> ``(B, T, vocab)`` logits."""

  vocab: int = 256
  width: int = 128
  depth: int = 2
  heads: int = 4
  context: int = 128

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[-1]
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.width))
    h = nn.Embed(self.vocab, self.width)(tokens) + pos[:t]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      h = h + nn.SelfAttention(num_heads=self.heads, qkv_features=self.width)(
          nn.LayerNorm()(h), mask=mask)
      h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))
