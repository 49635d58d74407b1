"""The fused path: the training step's own forward pass feeds the K controller's estimate.

An estimate (:mod:`kstep._src.k_estimate`) linearises the model on about ``probe_batch_size``
rows of the batch: one forward pass, then one VJP per probe cotangent, a JVP and VJP per power
step and a JVP for the guard's Rayleigh quotient.
The training step has just run the forward pass on those rows. :func:`value_and_grad` runs it
once for both: it splits the batch into the probe rows (linearised: ``jax.linearize``) and the
rest (``jax.vjp``), and on the probe rows differentiates the loss's output gradient *and* the
estimate's cotangents from the one linearisation. The loss, the gradient and a
:class:`FusedProbe` come back; ``update(..., probe=probe)`` uses the probe instead of estimating
again, so an estimate costs only its extra products.

Which estimate the next update makes (none, the first, a full one with the guard's power steps
and the floor's NTK probe, or a light one) is decided by the controller at the previous update
and kept in its state (``next_estimate``); :func:`value_and_grad` reads it there, so the two
always agree. On steps without an estimate it is ``jax.value_and_grad`` of the mean loss; the
first estimate (whole batch, more probes) is left to ``update``.

With the same key and rows, the fused estimate is the unfused one (tested to float32 rounding),
and the gradient is ``jax.grad`` of the mean per-example loss.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kstep._src import arguments, control_state, conv_layout, k_estimate, losses, options
from kstep._src.control_state import ScaleByKControlState
from kstep._src.estimators import linearization, products, traces
from kstep._src.estimators import tree_math as tm
from kstep._src.options import Estimate, Guard

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class FusedProbe:
  """What :func:`value_and_grad` measured for the next update's estimate (a pytree).

  Attributes:
    trace: T̂ on the probe rows (one probe); NaN where this step has no fused estimate.
    ntk_trace: the floor's NTK trace on the probe rows (NaN where not probed).
    lambda_max: the guard's Rayleigh quotient after the power steps (NaN where none ran).
    eigenvector: the power iteration's next vector (the state's where none ran; ``()`` without
      a guard).
    loss_name, probe_batch_size, power_iters, trace_floor: the static configuration it was
      made with; ``update`` checks it against its own.
  """

  trace: Array
  ntk_trace: Array
  lambda_max: Array
  eigenvector: PyTree
  loss_name: str
  probe_batch_size: int | None
  power_iters: int
  trace_floor: bool


jax.tree_util.register_dataclass(
    FusedProbe, data_fields=["trace", "ntk_trace", "lambda_max", "eigenvector"],
    meta_fields=["loss_name", "probe_batch_size", "power_iters", "trace_floor"],
)


def controller_state(state: Any) -> ScaleByKControlState:
  """The one :class:`kstep.ScaleByKControlState` inside an optimizer state.

  Raises:
    ValueError: none, or more than one.
  """
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByKControlState))
           if isinstance(s, ScaleByKControlState)]
  if len(found) != 1:
    raise ValueError(f"kstep.value_and_grad needs the state of an optimizer with exactly one K "
                     f"controller (kstep.k_controlled_sgd); this state holds {len(found)}.")
  return found[0]


def check_probe(probe: Any, *, loss: losses.OutputLoss, trace_floor: Any, num_probes: int,
                power_iters: int, probe_batch_size: int | None, estimator: str,
                output_norm: str, axis_name: Any) -> None:
  """Raises ``ValueError`` (at trace time) where ``probe`` does not fit the controller."""
  if not isinstance(probe, FusedProbe):
    raise ValueError(f"`probe` must come from kstep.value_and_grad; got {type(probe).__name__}.")
  if axis_name is not None or estimator != "hutchinson" or num_probes != 1 or (
      output_norm == "max_output"):
    raise ValueError("kstep.value_and_grad's probe needs a controller with "
                     "Estimate(num_probes=1, estimator='hutchinson') and an output_norm other "
                     "than 'max_output', and no axis_name; call update without `probe` instead.")
  mine = dict(loss=loss.name, trace_floor=trace_floor is not None,
              power_iters=power_iters, probe_batch_size=probe_batch_size)
  theirs = dict(loss=probe.loss_name, trace_floor=probe.trace_floor,
                power_iters=probe.power_iters, probe_batch_size=probe.probe_batch_size)
  for name in mine:
    if mine[name] != theirs[name]:
      raise ValueError(f"kstep.value_and_grad was built with {name}={theirs[name]!r} but the "
                       f"controller has {name}={mine[name]!r}: pass the controller's value.")


def estimate_from_probe(probe: FusedProbe, state: ScaleByKControlState, *, full: bool,
                        num_outputs: int, output_norm: str,
                        trace_floor: Any) -> k_estimate.KEstimate:
  """The controller's estimate from ``probe`` (``full``: with its λ, vector and NTK trace; else
  the state's vector and last NTK scale), as :func:`kstep._src.k_estimate.estimate` makes it."""
  guard = bool(jax.tree.leaves(state.gn_eigenvector))
  scale = probe.trace / num_outputs if output_norm == "per_output" else probe.trace
  vector = (probe.eigenvector if full else state.gn_eigenvector) if guard else None
  return k_estimate.assemble(
      probe.trace, scale, probe.lambda_max if guard and full else jnp.float32(jnp.nan), vector,
      num_outputs=num_outputs, output_norm=output_norm, trace_floor=trace_floor,
      ntk_trace=probe.ntk_trace, ntk_scale=None if full else state.k_ntk_scale)


def _split_rows(batch: Any, rows: int, stride: int) -> tuple[Any, Any]:
  """``(probe, rest)``: every ``stride``-th row (:func:`kstep._src.k_estimate.probe_rows`) and the
  others, for leaves whose leading dimension is ``rows``; other leaves go to both whole."""
  rest = np.setdiff1d(np.arange(rows), np.arange(0, rows, stride))
  is_rows = lambda leaf: jnp.ndim(leaf) > 0 and jnp.shape(leaf)[0] == rows
  probe = jax.tree.map(lambda leaf: leaf[::stride] if is_rows(leaf) else leaf, batch)
  others = jax.tree.map(
      lambda leaf: jnp.take(jnp.asarray(leaf), rest, axis=0) if is_rows(leaf) else leaf, batch)
  return probe, others


def value_and_grad(
    per_example_loss: Callable[[Array, Any], Array],
    apply_fn: Callable[[PyTree, Any], Array],
    *,
    loss: str | Callable[..., Array] = "mse",
    trace_floor: float | str | None = "auto",
    estimate: Estimate = Estimate(),
    guard: Guard | None = Guard(),
) -> Callable[..., tuple[tuple[Array, FusedProbe], PyTree]]:
  """The training loss, its gradient and the K controller's next estimate from one forward pass.

  Returns ``f(params, batch, *, state) -> ((loss, probe), grads)``, the loss being
  ``mean_i per_example_loss(apply_fn(params, batch), batch)_i``; pass ``probe`` to the
  controller's ``update(..., probe=probe)``. On a step with an estimate the probe rows are
  linearised once for the gradient and the estimate's products (module docstring); elsewhere it
  is ``jax.value_and_grad`` of the mean loss. When it pays: ``docs/controller.md``, "Fused path".

  Args:
    per_example_loss: ``(outputs, batch) -> (B,)`` losses; regularisers belong in the optimizer.
    apply_fn: ``apply_fn(params, batch) -> outputs``, the controller's.
    loss: the controller's ``loss``, a named one (a callable has no probe sampler).
    trace_floor: the controller's ``trace_floor``.
    estimate: the controller's :class:`kstep.Estimate` (one Hutchinson probe, an output norm
      other than ``"max_output"``).
    guard: the controller's :class:`kstep.Guard` or ``None``.

  Returns:
    ``f(params, batch, *, state)``, ``state`` the optimizer state holding one K controller.

  >>> import jax, jax.numpy as jnp, optax, kstep
  >>> apply_fn = lambda p, batch: batch["x"] @ p["w"]
  >>> per_example = lambda out, batch: 0.5 * jnp.sum((out - batch["y"]) ** 2, axis=-1)
  >>> params = {"w": jnp.zeros((3, 2))}
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 3))
  >>> batch = {"x": x, "y": x @ jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
  >>> every2 = kstep.Estimate(every=2)
  >>> opt = kstep.k_controlled_sgd(1.0, apply_fn=apply_fn, estimate=every2, decay_steps=100)
  >>> grad_fn = kstep.value_and_grad(per_example, apply_fn, estimate=every2)
  >>> @jax.jit
  ... def step(params, state, batch):
  ...   (loss, probe), grads = grad_fn(params, batch, state=state)
  ...   updates, state = opt.update(grads, state, params, batch=batch, probe=probe)
  ...   return optax.apply_updates(params, updates), state, loss
  >>> state = opt.init(params)
  >>> for _ in range(40):
  ...   params, state, loss = step(params, state, batch)
  >>> bool(loss < 0.05), int(kstep.stats(state)["k_num_estimates"])  # from 2.1 at w = 0
  (True, 20)

  Raises:
    ValueError: at construction, naming the argument that is out of range; at the call, a state
      without exactly one K controller; in ``update``, a probe made with other options.
  """

  arguments.check_callable("per_example_loss", per_example_loss, "(outputs, batch) -> (B,)")
  arguments.check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  spec = losses.resolve_loss(loss)
  if spec.noise is None:
    raise ValueError("kstep.value_and_grad needs a named `loss` (a callable has no probe "
                     "sampler; use the unfused update).")
  options.check_group("estimate", estimate, Estimate, optional=False)
  options.check_group("guard", guard, Guard, optional=True)
  floor = options.resolve_trace_floor(trace_floor, loss) is not None
  pbs = estimate.probe_batch_size
  iters = options.guard_or_default(guard).power_iters
  mse = losses.resolve_loss("mse")

  def mean_loss(params: PyTree, batch: Any) -> Array:
    return jnp.mean(per_example_loss(apply_fn(params, batch), batch))

  def fused(params: PyTree, batch: Any, ctl: ScaleByKControlState, full: bool):
    rows = jax.eval_shape(lambda p: apply_fn(p, batch), params).shape[0]
    stride = 1 if pbs is None or pbs >= rows else rows // pbs
    probe_batch, rest_batch = _split_rows(batch, rows, stride)
    lin = linearization.linearize(apply_fn, params, probe_batch, loss=spec)
    out_p = lin.outputs.reshape(lin.out_shape)
    sum_loss = lambda out, b: jnp.sum(per_example_loss(out, b))
    value_p, grad_out_p = jax.value_and_grad(sum_loss)(out_p, probe_batch)
    cotangents = [grad_out_p.reshape(lin.outputs.shape) / rows]
    value_rest, grads_rest = jnp.zeros((), value_p.dtype), None
    if stride > 1:
      out_r, vjp_r = jax.vjp(lambda p: apply_fn(p, rest_batch), params)
      value_rest, grad_out_r = jax.value_and_grad(sum_loss)(out_r, rest_batch)
      grads_rest = vjp_r(grad_out_r / rows)[0]
    # The controller's keys: estimate() splits the folded key in two and the first probe uses
    # the first half's first split (traces._map_probes), so fused and unfused probes agree.
    key = jax.random.fold_in(ctl.key, ctl.count)
    probe_key = jax.random.split(jax.random.split(key, 2)[0], 1)[0]
    specs = (spec, mse) if floor and full else (spec,)
    shaped = tuple(s.for_output_shape(lin.out_shape) for s in specs)
    cotangents += list(traces.probe_cotangents(lin, shaped, probe_batch, probe_key))
    guard = full and bool(jax.tree.leaves(ctl.gn_eigenvector))
    lam, vector = jnp.full((), jnp.nan, jnp.float32), ctl.gn_eigenvector
    if guard:
      if iters > 1:
        vector = k_estimate.power_steps(lin, spec, probe_batch, vector, iters - 1)
      unit = tm.unit(tm.f32(vector))[0]
      cotangents.append(products.gauss_newton_cotangent(lin, shaped[0], probe_batch, unit))
    vjps = linearization.vjps(lin, jnp.stack([c.astype(jnp.float32) for c in cotangents]))
    grads = vjps[0] if grads_rest is None else jax.tree.map(jnp.add, vjps[0], grads_rest)
    samples = traces.probe_samples(vjps[1:1 + len(specs)], lin.num_rows_total)
    if guard:  # the last power step's product came with the gradient; then its quotient
      vector = k_estimate.power_update(unit, vjps[-1])[0]
      lam = products.gauss_newton_quadratic(lin, spec, probe_batch, vector)
    nan = jnp.full((), jnp.nan, jnp.float32)
    probe = FusedProbe(samples[0], samples[1] if len(specs) > 1 else nan, lam, vector,
                       spec.name, pbs, iters, floor)
    return ((value_p + value_rest) / rows, probe), grads

  def plain(params: PyTree, batch: Any, ctl: ScaleByKControlState):
    value, grads = jax.value_and_grad(mean_loss)(params, batch)
    nan = jnp.full((), jnp.nan, jnp.float32)
    return (value, FusedProbe(nan, nan, nan, ctl.gn_eigenvector, spec.name, pbs, iters,
                              floor)), grads

  def f(params: PyTree, batch: Any, *, state: Any):
    ctl = controller_state(state)
    mode = ctl.next_estimate
    branch = jnp.where(mode == control_state.FULL, 1, jnp.where(mode == control_state.LIGHT, 2, 0))
    # Each branch's convolutions in XLA:CPU's fast order (kstep._src.conv_layout).
    return jax.lax.switch(branch, [conv_layout.canonical_convs(b) for b in (
        lambda: plain(params, batch, ctl), lambda: fused(params, batch, ctl, True),
        lambda: fused(params, batch, ctl, False))])

  return f
