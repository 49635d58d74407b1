"""The optimizers compared, built from a (possibly traced) base LR so one jit serves a sweep.

The SGD family uses heavy-ball momentum 0.9 where it has momentum; the Adam family (``adamw_*``,
``kstep_adam_anneal``, ``schedule_free_adamw``) β₁ = 0.9, β₂ = 0.999, ε = 1e-8, no weight decay.
``lr`` and ``band`` may be tracers: a sweep over base LRs, seeds or bands compiles once per
optimizer.

The kstep rows run ``k_controlled_sgd`` at its defaults (``target=None``: the loss's default band
and output norm) unless a band is given; ``--kstep-kwargs`` adds options in their JSON form
(:func:`kstep_options`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import kstep

MOMENTUM = 0.9
SWEPT = ("sgd", "cosine", "warmup_cosine", "kstep_anneal", "kstep_warmup", "kstep",
         "kstep_cosine", "schedule_free", "adamw_cosine", "adamw_warmup_cosine",
         "kstep_adam_anneal", "schedule_free_adamw")
LR_FREE = ("prodigy", "dog", "polyak_sgd")
ALL = SWEPT + LR_FREE
# The Adam family's rows (issue 28) and its base LRs, 1e-5 to 0.1.
ADAM_PARITY = ("adamw_cosine", "adamw_warmup_cosine", "kstep_adam_anneal", "schedule_free_adamw",
               "prodigy")
ADAM_LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
# The rows of the parity table (issue 11), and what ``run`` trains by default.
PARITY = ("cosine", "warmup_cosine", "kstep_anneal", "kstep", "schedule_free", "prodigy", "dog",
          "polyak_sgd")
KSTEP = ("kstep_anneal", "kstep_warmup", "kstep", "kstep_cosine", "kstep_adam_anneal")
SCHEDULE_FREE = ("schedule_free", "schedule_free_adamw")
LABELS = {
    "sgd": "SGD+mom, constant LR",
    "cosine": "SGD+mom, cosine",
    "warmup_cosine": "SGD+mom, warmup-cosine",
    "kstep_anneal": "k_controlled_sgd, defaults, annealed band (decay_steps=steps)",
    "kstep_warmup": "k_controlled_sgd, defaults, band warmed up over 5% then cosine (band_decay)",
    "kstep": "k_controlled_sgd, defaults, constant band",
    "kstep_cosine": "k_controlled_sgd, cosine base LR, constant band",
    "schedule_free": "schedule_free_sgd (LR swept)",
    "prodigy": "prodigy (LR-free, lr=1)",
    "dog": "DoG (LR-free, lr=1)",
    "polyak_sgd": "polyak_sgd (LR-free, f*=0, max LR 1)",
    "adamw_cosine": "AdamW, cosine",
    "adamw_warmup_cosine": "AdamW, warmup-cosine",
    "kstep_adam_anneal": "k_controlled_adam, defaults, annealed band (decay_steps=steps)",
    "schedule_free_adamw": "schedule_free_adamw (LR swept)",
}
# Short names for tables.
SHORT = {"kstep_anneal": "kstep (annealed)", "kstep_warmup": "kstep (warmup+annealed)",
         "kstep": "kstep (constant band)",
         "schedule_free": "schedule-free", "warmup_cosine": "warmup-cosine",
         "polyak_sgd": "polyak_sgd", "prodigy": "prodigy", "dog": "DoG",
         "adamw_cosine": "AdamW cosine", "adamw_warmup_cosine": "AdamW warmup-cosine",
         "kstep_adam_anneal": "kstep Adam (annealed)",
         "schedule_free_adamw": "schedule-free AdamW"}
# Trajectory keys recorded for the kstep rows when the controller reports them; the first name
# found wins (new name first, the pre-rename name second).
KSTEP_TRACE = {
    "k": ("k",),
    "lr": ("k_learning_rate", "learning_rate"),
    "trace": ("k_trace", "trace"),
    "k_scale": ("k_scale",),
    "k_num_outputs": ("k_num_outputs",),
    "sharpness_ratio": ("sharpness_ratio",),
    "gn_lambda_max": ("gn_lambda_max",),
}


def kstep_stat(stats: dict[str, Any], *names: str) -> Any:
  """The first of ``names`` present in ``stats`` (e.g. ``"k_learning_rate", "learning_rate"``)."""
  for name in names:
    if name in stats:
      return stats[name]
  raise KeyError(f"none of {names} in kstep.stats(state) (keys: {sorted(stats)})")


def kstep_options(kwargs: dict[str, Any] | None) -> dict[str, Any]:
  """``k_controlled_sgd`` keyword arguments from their JSON form (``--kstep-kwargs``):
  ``"estimate"`` and ``"guard"`` given as dicts of their fields become ``kstep.Estimate`` and
  ``kstep.Guard`` (``"guard": null`` turns the guard off); the rest pass as they are."""
  out = dict(kwargs or {})
  if isinstance(out.get("estimate"), dict):
    out["estimate"] = kstep.Estimate(**out["estimate"])
  if isinstance(out.get("guard"), dict):
    out["guard"] = kstep.Guard(**out["guard"])
  if isinstance(out.get("target"), list):
    out["target"] = tuple(out["target"])
  return out


def kstep_config(name: str, loss: str, band: Any, steps: int) -> dict[str, Any]:
  """What the kstep row ran with, recorded in the run JSON (``config.kstep``)."""
  from kstep._src import k_estimate, options

  norm = k_estimate.resolve_output_norm("auto", loss)
  adaptive = name == "kstep_adam_anneal"
  target = (list(options.default_target(loss, norm, adaptive)) if band is None
            else [float(b) for b in band])
  return {"output_norm": norm, "target": target, "target_is_default": band is None,
          "decay_steps": steps if name in ("kstep_anneal", "kstep_adam_anneal") else None,
          "base_lr_schedule": "cosine" if name == "kstep_cosine" else "constant"}


def schedule(name: str, lr: Any, steps: int) -> Callable[[Any], Any]:
  """The base-LR schedule of a swept optimizer (a function of the update count)."""
  if name in ("cosine", "kstep_cosine", "adamw_cosine"):
    unit = optax.cosine_decay_schedule(1.0, steps)
    return lambda t: lr * unit(t)
  if name in ("warmup_cosine", "adamw_warmup_cosine"):  # 5% linear warmup, then cosine to 0
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(steps // 20, 1), steps)
    return lambda t: lr * unit(t)
  if name in SCHEDULE_FREE:
    warmup = max(steps // 20, 1)
    return lambda t: lr * jnp.minimum(1.0, (jnp.asarray(t, jnp.float32) + 1) / warmup)
  return lambda t: lr + 0.0 * jnp.asarray(t, jnp.float32)


def make(name: str, lr: Any, *, steps: int, apply_fn: Callable, loss: str, batch_size: int,
         band: Any = None, seed: Any = 0,
         kstep_kwargs: dict | None = None) -> optax.GradientTransformationExtraArgs:
  """Optimizer ``name`` at base LR ``lr`` (ignored by the LR-free ones).

  ``band`` (kstep rows only): ``None`` runs the controller's default band, ``(lo, hi)`` that band.
  ``kstep_kwargs`` (kstep rows only): more ``k_controlled_sgd`` arguments, e.g. a trial's.
  """
  if name in ("sgd", "cosine", "warmup_cosine"):
    opt = optax.sgd(schedule(name, lr, steps), momentum=MOMENTUM)
  elif name in ("adamw_cosine", "adamw_warmup_cosine"):
    opt = optax.adamw(schedule(name, lr, steps), weight_decay=0.0)
  elif name in KSTEP:
    base = schedule(name, lr, steps) if name == "kstep_cosine" else lr
    extra = dict(kstep_kwargs or {})
    estimate = dict(extra.pop("estimate", None) or {}, seed=seed)
    kwargs = dict(batch_size=batch_size, apply_fn=apply_fn, loss=loss, estimate=estimate)
    if band is not None:
      kwargs["target"] = tuple(band)
    if name in ("kstep_anneal", "kstep_adam_anneal"):
      kwargs["decay_steps"] = steps
    if name == "kstep_warmup":
      kwargs["decay_steps"] = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(steps // 20, 1),
                                                                 steps)
    if name == "kstep_adam_anneal":
      opt = kstep.k_controlled_adam(base, **kstep_options({**kwargs, **extra}))
    else:
      kwargs["momentum"] = MOMENTUM
      opt = kstep.k_controlled_sgd(base, **kstep_options({**kwargs, **extra}))
  elif name == "schedule_free":
    opt = optax.contrib.schedule_free_sgd(lr, warmup_steps=max(steps // 20, 1), b1=MOMENTUM)
  elif name == "schedule_free_adamw":
    opt = optax.contrib.schedule_free_adamw(lr, warmup_steps=max(steps // 20, 1),
                                            weight_decay=0.0)
  elif name == "prodigy":
    opt = optax.contrib.prodigy()
  elif name == "dog":
    opt = optax.contrib.dog()
  elif name == "polyak_sgd":
    opt = optax.polyak_sgd()  # step min((f - 0) / |g|², 1); needs update(..., value=loss)
  else:
    raise ValueError(f"unknown optimizer {name!r}; one of {ALL}")
  return optax.with_extra_args_support(opt)


def extra_args(name: str, batch: Any, loss: Any) -> dict[str, Any]:
  """The keyword arguments ``update`` of optimizer ``name`` needs beyond grads/state/params."""
  if name in KSTEP:
    return {"batch": batch}
  if name == "polyak_sgd":
    return {"value": loss}
  return {}


def eval_params(name: str, state: Any, params: Any) -> Any:
  """The parameters to evaluate (schedule-free evaluates its averaged iterate)."""
  if name in SCHEDULE_FREE:
    return optax.contrib.schedule_free_eval_params(state, params)
  return params


def record(name: str, state: Any, lr: Any, steps: int, count: Any, loss: Any = None,
           grads: Any = None) -> dict[str, Any]:
  """K, the step actually taken and the trace at update ``count`` (NaN where the optimizer has
  none); for the kstep rows also ``k_num_outputs``, ``sharpness_ratio``, ``gn_lambda_max`` and
  ``k_scale`` when the controller reports them."""
  nan = jnp.asarray(jnp.nan, jnp.float32)
  if name in KSTEP:
    s = kstep.stats(state)
    out = {}
    for key, names in KSTEP_TRACE.items():
      if any(n in s for n in names):
        out[key] = jnp.asarray(kstep_stat(s, *names), jnp.float32)
    return out
  if name == "prodigy":
    step = optax.tree.get(state, "estim_lr")
  elif name == "dog":
    step = optax.tree.get(state, "max_dist") / jnp.sqrt(
        optax.tree.get(state, "sum_sq_norm_grads") + 1e-8)
  elif name == "polyak_sgd":  # optax.polyak_sgd() keeps no state: recompute its step
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    step = jnp.where(sq <= jnp.finfo(jnp.float32).eps, 0.0, jnp.minimum(loss / sq, 1.0))
  else:
    step = schedule(name, lr, steps)(count)
  return {"k": nan, "lr": jnp.asarray(step, jnp.float32), "trace": nan}
