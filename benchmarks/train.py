"""One training run: a jitted ``lax.scan`` over chunks of steps, trajectories every few steps.

Every optimizer sees the same init (``PRNGKey(seed)``), the same data order (epochs of a
permutation drawn from ``seed``) and the same number of steps. Base LR, band and seed enter the
jitted functions as arguments, so a sweep compiles once per (task, loss, batch size, optimizer,
whether a band is given).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import kstep
from benchmarks import optimizers
from benchmarks.tasks import CALIBRATION_ROWS, KSTEP_LOSS, Problem

NUM_POINTS = 50  # recorded points per trajectory
EVAL_TRAIN = 5000  # training examples the final train loss is measured on


def data_order(seed: int, num_train: int, steps: int, batch_size: int) -> np.ndarray:
  """``(steps, batch_size)`` indices: epochs of a permutation, the same for every optimizer."""
  if batch_size > num_train:
    raise ValueError(f"batch size {batch_size} exceeds the {num_train} training examples")
  rng = np.random.default_rng(10_000 + seed)
  per_epoch = num_train // batch_size
  epochs = -(-steps // per_epoch)
  idx = [rng.permutation(num_train)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
         for _ in range(epochs)]
  return np.concatenate(idx)[:steps].astype(np.int32)


class Runner:
  """Jitted init / chunk / eval functions of one (problem, optimizer); reused across a sweep."""

  def __init__(self, problem: Problem, name: str, steps: int | None = None,
               banded: bool = False, kstep_kwargs: dict | None = None):
    self.p, self.name, self.banded = problem, name, banded
    self.kstep_kwargs = dict(kstep_kwargs or {})
    self.steps = steps or problem.steps
    self.x_train, self.y_train = jnp.asarray(problem.x_train), jnp.asarray(problem.y_train)
    self.x_test, self.y_test = jnp.asarray(problem.x_test), jnp.asarray(problem.y_test)
    self._init = jax.jit(self._init_impl)
    self._chunk = jax.jit(self._chunk_impl)
    self._eval = jax.jit(self._eval_impl)

  def optimizer(self, lr, band, seed) -> optax.GradientTransformationExtraArgs:
    apply_fn = lambda params, batch: self.p.apply(params, batch["x"])
    return optimizers.make(self.name, lr, steps=self.steps, apply_fn=apply_fn,
                           loss=KSTEP_LOSS[self.p.loss], batch_size=self.p.batch_size,
                           band=band if self.banded else None, seed=seed,
                           kstep_kwargs=self.kstep_kwargs)

  def loss_fn(self, params, batch):
    return jnp.mean(self.p.per_example_loss(self.p.apply(params, batch["x"]), batch["y"]))

  def _init_impl(self, seed, lr, band):
    params = self.p.init(jax.random.PRNGKey(seed))
    return params, self.optimizer(lr, band, seed).init(params)

  def _chunk_impl(self, params, state, idx, start, lr, band, seed, x_train, y_train):
    opt = self.optimizer(lr, band, seed)

    def body(carry, inp):
      params, state = carry
      t, i = inp
      batch = {"x": x_train[i], "y": y_train[i]}
      loss, grads = jax.value_and_grad(self.loss_fn)(params, batch)
      updates, state = opt.update(grads, state, params,
                                  **optimizers.extra_args(self.name, batch, loss))
      params = optax.apply_updates(params, updates)
      rec = optimizers.record(self.name, state, lr, self.steps, t, loss, grads)
      return (params, state), {"loss": loss, **rec}

    steps = start + jnp.arange(idx.shape[0])
    return jax.lax.scan(body, (params, state), (steps, idx))

  def _eval_impl(self, params, state, x_train, y_train, x_test, y_test):
    params = optimizers.eval_params(self.name, state, params)
    if self.p.eval_apply is None:
      model = self.p.apply
    else:  # BatchNorm: eval mode on statistics from training rows at these params
      x_calibration = x_train[:CALIBRATION_ROWS]
      model = lambda params, x: self.p.eval_apply(params, x_calibration, x)

    def metrics(x, y, chunk):
      chunk = min(chunk, x.shape[0])
      n = (x.shape[0] // chunk) * chunk
      xs = x[:n].reshape(-1, chunk, *x.shape[1:])
      ys = y[:n].reshape(-1, chunk, *y.shape[1:])

      def one(xy):  # per example: its loss and its accuracy (over its positions for (B, T))
        logits = model(params, xy[0])
        right = (jnp.argmax(logits, -1) == xy[1]).reshape(chunk, -1)
        return (jnp.sum(self.p.per_example_loss(logits, xy[1])),
                jnp.sum(jnp.mean(right, axis=1)))

      loss, correct = jax.lax.map(one, (xs, ys))
      return jnp.sum(loss) / n, jnp.sum(correct) / n

    train_loss, train_acc = metrics(x_train[:EVAL_TRAIN], y_train[:EVAL_TRAIN], 500)
    test_loss, test_acc = metrics(x_test, y_test, 500 if x_test.shape[0] % 500 == 0 else 397)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
            "test_acc": test_acc}

  def run(self, lr: float | None, seed: int, band=None, progress: bool = False) -> dict[str, Any]:
    """Trains one run; stops early (``diverged``) once the batch loss is not finite.

    ``band`` must be given exactly when the runner was built with ``banded=True``.
    """
    if (band is not None) != self.banded:
      raise ValueError(f"band {band} given to a runner with banded={self.banded}")
    t0 = time.perf_counter()
    lr_val = jnp.float32(1.0 if lr is None else lr)
    band_val = jnp.asarray(band if band is not None else (jnp.nan, jnp.nan), jnp.float32)
    seed_val = jnp.int32(seed)
    params, state = self._init(seed_val, lr_val, band_val)
    order = data_order(seed, len(self.p.x_train), self.steps, self.p.batch_size)
    every = max(self.steps // NUM_POINTS, 1)
    chunk = max(every, (self.steps // 10) // every * every)
    outs, diverged, done = [], False, 0
    for start in tqdm(range(0, self.steps, chunk), desc=f"{self.name} lr={lr}", leave=False,
                      disable=not progress):
      idx = jnp.asarray(order[start:start + chunk])
      (params, state), out = self._chunk(params, state, idx, jnp.int32(start), lr_val, band_val,
                                         seed_val, self.x_train, self.y_train)
      out = jax.device_get(out)
      outs.append(out)
      done = start + idx.shape[0]
      if not np.all(np.isfinite(out["loss"])):
        diverged = True
        break
    traj = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    final = jax.device_get(self._eval(params, state, self.x_train, self.y_train, self.x_test,
                                      self.y_test))
    final = {k: float(v) for k, v in final.items()}
    diverged = diverged or not np.isfinite(final["train_loss"])
    out = {
        "summary": {**final, "diverged": diverged, "steps_done": done,
                    "wall_s": time.perf_counter() - t0},
        "trajectory": downsample(traj, every, self.steps),
    }
    if self.name in optimizers.KSTEP:  # the controller's counters and last values at the end
      stats = jax.device_get(kstep.stats(state))
      out["kstep_final"] = {k: np.asarray(v).item() for k, v in stats.items()
                            if np.ndim(v) == 0}
    return out


def downsample(traj: dict[str, np.ndarray], every: int, steps: int) -> dict[str, list]:
  """Window means over every ``every`` steps (NaN past an early stop, inf once it blew up)."""
  n = steps // every
  out = {"step": [(i + 1) * every for i in range(n)]}
  for key, values in traj.items():
    padded = np.full(n * every, np.nan, np.float32)
    m = min(len(values), n * every)
    padded[:m] = values[:m]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
      warnings.simplefilter("ignore", RuntimeWarning)
      out[key] = np.nanmean(padded.reshape(n, every), axis=1).tolist()
  return out
