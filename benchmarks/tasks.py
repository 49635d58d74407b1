"""The trained tasks: data, model and the default sweep of each, at CPU or GPU scale.

A :class:`Problem` is everything :mod:`benchmarks.train` needs: arrays, ``init(key)``,
``apply(params, x)`` (the function trained, and the one kstep linearises) and the loss; a
BatchNorm model also brings ``eval_apply(params, x_calibration, x)`` (eval mode on statistics
recomputed from training data at the end of the run). Losses: ``"mse"`` is
ℓ = ½ Σ_c (f_c − onehot_c)² (kstep's ``"mse"``, H = I), ``"ce"`` the softmax cross-entropy
(kstep's ``"softmax_cross_entropy"``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import models

LOSSES = ("mse", "ce")
KSTEP_LOSS = {"mse": "mse", "ce": "softmax_cross_entropy"}
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # factor 3


@dataclasses.dataclass
class Problem:
  task: str
  scale: str  # "CPU", "CPU, reduced" or "GPU, full"
  loss: str
  x_train: np.ndarray
  y_train: np.ndarray  # int labels
  x_test: np.ndarray
  y_test: np.ndarray
  init: Callable[[jax.Array], Any]
  apply: Callable[[Any, jax.Array], jax.Array]
  batch_size: int
  steps: int
  notes: str = ""
  num_classes: int = 10
  eval_apply: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None

  def per_example_loss(self, logits: jax.Array, y: jax.Array) -> jax.Array:
    """``(B,)``: the loss of each example, the mean over its positions for ``(B, T)`` labels."""
    onehot = jax.nn.one_hot(y, self.num_classes, dtype=logits.dtype)
    if self.loss == "mse":
      per = 0.5 * jnp.sum(jnp.square(logits - onehot), axis=-1)
    else:
      per = optax.softmax_cross_entropy(logits, onehot)
    return per.reshape(per.shape[0], -1).mean(axis=1)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The default sweep of a task at one scale (every field can be overridden on the CLI)."""

  steps: int
  batch_size: int
  lrs: tuple[float, ...] = LR_GRID
  seeds: tuple[int, ...] = (0, 1, 2)
  losses: tuple[str, ...] = LOSSES
  band_lrs: tuple[float, ...] = (1e-3, 3.0)
  band_seeds: tuple[int, ...] = (0, 1, 2)
  context: int = 0  # sequence tasks: the window length T


def _model_problem(task, scale, loss, data, model, batch_size, steps, notes) -> Problem:
  x_train, y_train, x_test, y_test = data
  return Problem(
      task=task, scale=scale, loss=loss, x_train=x_train, y_train=y_train, x_test=x_test,
      y_test=y_test, init=lambda key: model.init(key, jnp.asarray(x_train[:1])),
      apply=model.apply, batch_size=batch_size, steps=steps, notes=notes,
  )


def _digits() -> tuple[np.ndarray, ...]:
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm].astype(np.int32)
  return x[:1400], y[:1400], x[1400:], y[1400:]


def _data_file(data_dir: str | None, name: str) -> pathlib.Path:
  if data_dir is None:
    raise SystemExit(f"{name} needs --data-dir (or KSTEP_DATA) pointing at a folder with {name}")
  path = pathlib.Path(data_dir) / name
  if not path.exists():
    raise SystemExit(f"{path} not found (see the README for the data files)")
  return path


def _npz(data_dir: str | None, name: str) -> Any:
  return np.load(_data_file(data_dir, name))


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean, std = x_train.mean(0), x_train.std(0) + 1e-3
  return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _mnist(data_dir: str | None, num_train: int) -> tuple[np.ndarray, ...]:
  d = _npz(data_dir, "mnist.npz")
  x_train = d["x_train"].reshape(-1, 784).astype(np.float32) / 255.0
  x_test = d["x_test"].reshape(-1, 784).astype(np.float32) / 255.0
  idx = np.random.default_rng(0).permutation(len(x_train))[:num_train]
  x_train, y_train = x_train[idx], d["y_train"][idx].astype(np.int32)
  x_train, x_test = _standardize(x_train, x_test)
  return x_train, y_train, x_test, d["y_test"].astype(np.int32)


def _pool(x: np.ndarray, factor: int) -> np.ndarray:
  """Average-pools images ``(N, H, W, C)`` by ``factor`` (CPU-reduced CIFAR: 32x32 -> 16x16)."""
  if factor == 1:
    return x
  n, h, w, c = x.shape
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def _cifar(data_dir: str | None, downsample: int = 1) -> tuple[np.ndarray, ...]:
  d = _npz(data_dir, "cifar10_subset.npz")
  x_train = _pool(d["x_train"].astype(np.float32) / 255.0, downsample)
  x_test = _pool(d["x_test"].astype(np.float32) / 255.0, downsample)
  mean, std = x_train.mean((0, 1, 2)), x_train.std((0, 1, 2))
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  return (x_train.astype(np.float32), d["y_train"].astype(np.int32), x_test.astype(np.float32),
          d["y_test"].astype(np.int32))


CIFAR_NOTE = ("CIFAR-10 subset (10k train / 2k test) decoded from a public JPEG copy of CIFAR-10 "
              "(quality ~75): real images, slightly degraded, not bit-exact")

DEFAULTS: dict[tuple[str, str], Defaults] = {
    ("digits_mlp", "cpu"): Defaults(steps=500, batch_size=64),
    ("mnist_mlp", "cpu"): Defaults(steps=1000, batch_size=128, band_seeds=(0,)),
    ("cifar10_resnet18", "cpu"): Defaults(steps=200, batch_size=32, seeds=(0,),
                                          band_seeds=(0,)),
    ("cifar10_resnet18", "gpu"): Defaults(steps=1560, batch_size=128),
}
TASKS = ("digits_mlp", "mnist_mlp", "cifar10_resnet18", "cifar10_bn_resnet18")
# Language models: (B, T) bytes in, (B, T, 256) logits out, the loss the mean over tokens;
# cross-entropy only, the Adam family, metric validation bits per byte (benchmarks/lm_report.py).
LM_TASKS = ("shakespeare_lm",)
DEFAULTS[("shakespeare_lm", "cpu")] = Defaults(
    steps=400, batch_size=32, lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    losses=("ce",), context=64)
# Models on random data, for the overhead benchmark only (nothing to learn, nothing to evaluate).
SYNTHETIC_TASKS = ("synthetic_convnet", "synthetic_tanh_mlp")
DEFAULTS[("synthetic_convnet", "cpu")] = Defaults(steps=200, batch_size=32)
DEFAULTS[("synthetic_tanh_mlp", "cpu")] = Defaults(steps=200, batch_size=128)
DEFAULTS[("cifar10_bn_resnet18", "cpu")] = DEFAULTS[("cifar10_resnet18", "cpu")]
DEFAULTS[("cifar10_bn_resnet18", "gpu")] = DEFAULTS[("cifar10_resnet18", "gpu")]
# Rows of training data whose batch statistics (in chunks of CALIBRATION_CHUNK) give a BatchNorm
# model's population statistics for evaluation.
CALIBRATION_ROWS, CALIBRATION_CHUNK = 2000, 500


def _batchnorm_problem(task, scale, loss, data, model, batch_size, steps, notes) -> Problem:
  """A BatchNorm model trained in train mode (``apply``: the batch's own statistics, the
  function SGD differentiates and kstep linearises; docs/batchnorm.md) and evaluated in eval
  mode on population statistics: the mean over chunks of training rows of each chunk's batch
  statistics at the final parameters (running averages of the training run are not kept)."""
  x_train, y_train, x_test, y_test = data
  calibrate = model.clone(bn_momentum=0.0)  # running statistics := the chunk's statistics

  def apply(params, x):
    return model.apply({"params": params}, x, train=True, mutable=["batch_stats"])[0]

  def eval_apply(params, x_calibration, x):
    chunk = min(CALIBRATION_CHUNK, x_calibration.shape[0])
    rows = x_calibration.shape[0] // chunk * chunk
    chunks = x_calibration[:rows].reshape(-1, chunk, *x_calibration.shape[1:])
    stats = jax.lax.map(lambda c: calibrate.apply({"params": params}, c, train=True,
                                                  mutable=["batch_stats"])[1]["batch_stats"],
                        chunks)
    stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)

  return Problem(
      task=task, scale=scale, loss=loss, x_train=x_train, y_train=y_train, x_test=x_test,
      y_test=y_test, batch_size=batch_size, steps=steps, notes=notes, apply=apply,
      init=lambda key: model.init(key, jnp.asarray(x_train[:1]), train=False)["params"],
      eval_apply=eval_apply,
  )


def _random(shape: tuple[int, ...], rows: int = 2048) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((rows, *shape)).astype(np.float32)
  y = rng.integers(0, 10, rows).astype(np.int32)
  return x, y, x[:256], y[:256]


def _shakespeare(data_dir: str | None, context: int) -> tuple[np.ndarray, ...]:
  """Non-overlapping windows of ``context + 1`` bytes: the first 90 % of the text for training,
  the last 10 % for validation; x the first ``context`` bytes of a window, y the next ones."""
  path = _data_file(data_dir, "shakespeare.txt")
  text = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int32)
  split = int(0.9 * len(text))

  def windows(part):
    n = (len(part) - 1) // context
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)
    w = part[idx]
    return w[:, :-1], w[:, 1:]

  return (*windows(text[:split]), *windows(text[split:]))


def defaults(task: str, scale: str) -> Defaults:
  if (task, scale) not in DEFAULTS:
    scale = "cpu"
  return DEFAULTS[(task, scale)]


def load(task: str, loss: str, *, scale: str = "cpu", data_dir: str | None = None,
         steps: int | None = None, batch_size: int | None = None) -> Problem:
  """Builds the :class:`Problem` of ``task`` with ``loss`` at ``scale`` ("cpu" or "gpu")."""
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
  d = defaults(task, scale)
  steps, batch_size = steps or d.steps, batch_size or d.batch_size
  if task == "digits_mlp":
    model = models.MLP(width=128, depth=2, activation="relu")
    return _model_problem(task, "CPU", loss, _digits(), model, batch_size, steps,
                          "scikit-learn digits 8x8, 1400 train / 397 test, MLP 128-128 ReLU")
  if task == "mnist_mlp":
    model = models.MLP(width=256, depth=2, activation="erf")
    return _model_problem(task, "CPU", loss, _mnist(data_dir, 10_000), model, batch_size, steps,
                          "MNIST, 10k-example train subset, full 10k test; FCN 256-256 erf "
                          "(K paper §4.1)")
  if task in ("cifar10_resnet18", "cifar10_bn_resnet18"):
    batchnorm = task == "cifar10_bn_resnet18"
    net, norm = ((models.BNResNet, "BatchNorm, ReLU") if batchnorm
                 else (models.ResNet, "LayerNorm, GELU"))
    if scale == "gpu":
      model, label, pool = net(width=64, blocks=(2, 2, 2, 2)), "GPU, full", 1
      arch = f"ResNet-18 (width 64, blocks 2-2-2-2), {norm}, 32x32 images"
    else:
      model, label, pool = net(width=8, blocks=(1, 1, 1)), "CPU, reduced", 2
      arch = f"reduced ResNet (width 8, blocks 1-1-1), {norm}, images average-pooled to 16x16"
    notes = f"{CIFAR_NOTE}; {arch}"
    if not batchnorm:
      return _model_problem(task, label, loss, _cifar(data_dir, pool), model, batch_size, steps,
                            notes)
    return _batchnorm_problem(
        task, label, loss, _cifar(data_dir, pool), model, batch_size, steps,
        f"{notes}; trained in train mode, evaluated on population statistics of "
        f"{CALIBRATION_ROWS} training rows")
  if task == "shakespeare_lm":
    if loss != "ce":
      raise ValueError("shakespeare_lm is trained with cross-entropy only (--losses ce)")
    t = d.context
    model = models.TransformerLM(width=128, depth=2, heads=4, context=t)
    problem = _model_problem(
        task, "CPU", loss, _shakespeare(data_dir, t), model, batch_size, steps,
        f"byte-level causal transformer (2 pre-LN blocks, width 128, 4 heads, context {t}) on "
        "shakespeare.txt, non-overlapping windows, last 10 % for validation")
    problem.num_classes = 256
    return problem
  if task == "synthetic_convnet":
    return _model_problem(task, "CPU", loss, _random((16, 16, 3)), models.PreActResNet(),
                          batch_size, steps, "random 16x16x3 inputs and labels; pre-activation "
                          "ResNet, LayerNorm, GELU, blocks of 32-64-64 channels (overhead only)")
  if task == "synthetic_tanh_mlp":
    model = models.MLP(width=256, depth=2, activation="tanh")
    return _model_problem(task, "CPU", loss, _random((784,)), model, batch_size, steps,
                          "random 784-dim inputs and labels; MLP 784-256-256-10 tanh "
                          "(overhead only)")
  raise ValueError(f"unknown task {task!r}; one of {TASKS + LM_TASKS + SYNTHETIC_TASKS} or linreg")
