"""Convolutions in XLA:CPU's canonical layout inside the estimate's control flow.

The controller's estimate and the trackers' measurements run inside ``lax.cond``. XLA:CPU hands
a convolution to its fast library kernels only in one dimension order, input ``NHWC``, kernel
``HWIO``, output ``NHWC`` (``b01f_01io->b01f``), and brings other convolutions into that order
only in the entry computation, not inside a conditional's or a loop's body
(`jax#12868 <https://github.com/jax-ml/jax/issues/12868>`_). A flax model's forward convolutions
are already in that order, but the ones autodiff writes for a VJP are not (the kernel gradient is
``f01b_i01o->01bf``); inside ``lax.cond`` they compile to plain loops: a VJP on 16 rows of a small
conv net took 374 ms there against 15 ms outside (2-core CPU), and compiling it took seconds.

:func:`canonical_convs` traces a function to a jaxpr and evaluates it again with every
convolution rewritten as transposes around the canonical one (the rewrite XLA makes in the entry
computation), recursing into the ``cond``, ``while`` and ``scan`` bodies and inlining calls; any
other primitive is bound as it was. Values are unchanged: only the order of dimensions moves.
It applies where the computation is lowered for CPU (``jax.default_backend() == "cpu"``);
elsewhere the function is returned as it is. Not covered: the kernel gradient of a grouped
convolution (``feature_group_count > 1``, e.g. depthwise), which XLA rewrites again into a
non-canonical batch-grouped form after this rewrite.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

conv_p = jcore.primitives.conv_general_dilated_p

# Call-like primitives whose body is inlined (their values are the body's).
_INLINED = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
            "custom_vjp_call", "custom_vjp_call_jaxpr")


def enabled() -> bool:
  """Whether :func:`canonical_convs` rewrites (the default backend is XLA:CPU)."""
  return jax.default_backend() == "cpu"


def canonical_convs(fn: Callable[..., Any], *, force: bool = False) -> Callable[..., Any]:
  """``fn`` with every convolution it computes in the canonical ``b01f_01io->b01f`` order.

  The same values (tested against ``fn``); where the backend is not CPU, ``fn`` itself unless
  ``force``. Arguments and results are pytrees of arrays.
  """
  if not (force or enabled()):
    return fn

  @functools.wraps(fn)
  def rewritten(*args):
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not _has_conv(closed.jaxpr):
      return fn(*args)
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)

  return rewritten


def canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """``conv_general_dilated`` with ``dimension_numbers``, computed in the canonical order."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec) - 2
  spatial = tuple(range(1, n + 1))
  canonical = jax.lax.ConvDimensionNumbers((0, n + 1, *spatial), (n + 1, n, *range(n)),
                                           (0, n + 1, *spatial))
  if tuple(dimension_numbers) == tuple(canonical):
    return conv_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  lhs = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = conv_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
  return jnp.transpose(out, tuple(np.argsort((out_spec[0], *out_spec[2:], out_spec[1]))))


def _has_conv(jaxpr: jcore.Jaxpr) -> bool:
  return any(eqn.primitive is conv_p
             or any(_has_conv(getattr(sub, "jaxpr", sub))
                    for sub in jcore.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def _sub(params: dict, *names: str) -> tuple[jcore.Jaxpr, Sequence[Any]]:
  for name in names:
    if name in params:
      sub = params[name]
      return (sub.jaxpr, sub.consts) if isinstance(sub, jcore.ClosedJaxpr) else (sub, ())
  raise KeyError(names)


def _eval_closed(closed: jcore.ClosedJaxpr, args: Sequence[Any]) -> list[Any]:
  return _eval(closed.jaxpr, closed.consts, args)


def _apply(eqn: jcore.JaxprEqn, vals: list[Any]) -> list[Any]:
  p, name = eqn.params, eqn.primitive.name
  if eqn.primitive is conv_p:
    return [canonical_conv(*vals, **p)]
  if not any(_has_conv(getattr(s, "jaxpr", s)) for s in jcore.jaxprs_in_params(p)):
    return _bind(eqn, vals)
  if name in _INLINED:
    jaxpr, consts = _sub(p, "jaxpr", "call_jaxpr", "fun_jaxpr")
    return _eval(jaxpr, consts, vals[len(vals) - len(jaxpr.invars):])
  if name == "cond":
    branches = [functools.partial(lambda b, *ops: _eval_closed(b, ops), b) for b in p["branches"]]
    return list(jax.lax.switch(vals[0], branches, *vals[1:]))
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cc, bc, init = vals[:cn], vals[cn:cn + bn], vals[cn + bn:]
    return list(jax.lax.while_loop(lambda c: _eval_closed(p["cond_jaxpr"], [*cc, *c])[0],
                                   lambda c: _eval_closed(p["body_jaxpr"], [*bc, *c]),
                                   list(init)))
  if name == "scan":
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]

    def body(carry, x):
      outs = _eval_closed(p["jaxpr"], [*consts, *carry, *x])
      return outs[:ncar], outs[ncar:]

    carry, ys = jax.lax.scan(body, list(init), list(xs), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]
  return _bind(eqn, vals)  # anything else: as it was


def _bind(eqn: jcore.JaxprEqn, vals: list[Any]) -> list[Any]:
  """The equation as ``jax.core.eval_jaxpr`` evaluates it."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*vals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    outs = _apply(eqn, [read(v) for v in eqn.invars])
    for v, out in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = out
  return [read(v) for v in jaxpr.outvars]
