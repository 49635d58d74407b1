"""The optimizers compared, built from a (possibly traced) base LR so one jit serves a sweep.

All use heavy-ball momentum 0.9 where they have momentum. ``lr`` and ``band`` may be tracers: a
sweep over base LRs, seeds or bands compiles once per optimizer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import optax
import optax.contrib

import kstep

MOMENTUM = 0.9
DEFAULT_BAND = (0.4, 0.8)
SWEPT = ("sgd", "cosine", "warmup_cosine", "kstep", "kstep_cosine", "schedule_free")
LR_FREE = ("prodigy", "dog")
ALL = SWEPT + LR_FREE
KSTEP = ("kstep", "kstep_cosine")
LABELS = {
    "sgd": "SGD+mom, constant LR",
    "cosine": "SGD+mom, cosine",
    "warmup_cosine": "SGD+mom, warmup-cosine",
    "kstep": "k_controlled_sgd, constant base LR",
    "kstep_cosine": "k_controlled_sgd, cosine base LR",
    "schedule_free": "schedule_free_sgd (LR swept)",
    "prodigy": "prodigy (LR-free, lr=1)",
    "dog": "DoG (LR-free, lr=1)",
}


def schedule(name: str, lr: Any, steps: int) -> Callable[[Any], Any]:
  """The base-LR schedule of a swept optimizer (a function of the update count)."""
  if name in ("cosine", "kstep_cosine"):
    unit = optax.cosine_decay_schedule(1.0, steps)
    return lambda t: lr * unit(t)
  if name == "warmup_cosine":  # 5% linear warmup from 0, then cosine to 0
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(steps // 20, 1), steps)
    return lambda t: lr * unit(t)
  if name == "schedule_free":
    warmup = max(steps // 20, 1)
    return lambda t: lr * jnp.minimum(1.0, (jnp.asarray(t, jnp.float32) + 1) / warmup)
  return lambda t: lr + 0.0 * jnp.asarray(t, jnp.float32)


def make(name: str, lr: Any, *, steps: int, apply_fn: Callable, loss: str, batch_size: int,
         band: Any = DEFAULT_BAND, seed: Any = 0) -> optax.GradientTransformationExtraArgs:
  """Optimizer ``name`` at base LR ``lr`` (ignored by the LR-free ones)."""
  if name in ("sgd", "cosine", "warmup_cosine"):
    opt = optax.sgd(schedule(name, lr, steps), momentum=MOMENTUM)
  elif name in KSTEP:
    base = lr if name == "kstep" else schedule(name, lr, steps)
    opt = kstep.k_controlled_sgd(
        base, batch_size=batch_size, apply_fn=apply_fn, loss=loss, target=tuple(band),
        momentum=MOMENTUM, seed=seed,
    )
  elif name == "schedule_free":
    opt = optax.contrib.schedule_free_sgd(lr, warmup_steps=max(steps // 20, 1), b1=MOMENTUM)
  elif name == "prodigy":
    opt = optax.contrib.prodigy()
  elif name == "dog":
    opt = optax.contrib.dog()
  else:
    raise ValueError(f"unknown optimizer {name!r}; one of {ALL}")
  return optax.with_extra_args_support(opt)


def eval_params(name: str, state: Any, params: Any) -> Any:
  """The parameters to evaluate (schedule-free evaluates its averaged iterate)."""
  if name == "schedule_free":
    return optax.contrib.schedule_free_eval_params(state, params)
  return params


def record(name: str, state: Any, lr: Any, steps: int, count: Any) -> dict[str, Any]:
  """K and the step actually taken at update ``count`` (NaN where the optimizer has none)."""
  nan = jnp.asarray(jnp.nan, jnp.float32)
  if name in KSTEP:
    s = kstep.stats(state)
    return {"k": s["k"], "lr": s["learning_rate"], "trace": s["trace"]}
  if name == "prodigy":
    step = optax.tree.get(state, "estim_lr")
  elif name == "dog":
    step = optax.tree.get(state, "max_dist") / jnp.sqrt(
        optax.tree.get(state, "sum_sq_norm_grads") + 1e-8)
  else:
    step = schedule(name, lr, steps)(count)
  return {"k": nan, "lr": jnp.asarray(step, jnp.float32), "trace": nan}
