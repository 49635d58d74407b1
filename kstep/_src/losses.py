"""Per-example losses seen through their output Hessians.

The Gauss–Newton trace (K paper, eq. 87/102/130) is ``T = (1/B) Σ_i tr(J_iᵀ H_i J_i)`` where
``H_i = ∂²ℓ/∂f²`` is the C×C Hessian of the per-example loss in the model's outputs. This module
holds, for each supported loss, three things the estimators need:

* ``hessian(outputs, batch)``: the blocks ``H_i`` (shape ``(B, C, C)``), for exact traces;
* ``sample(key, outputs, batch)``: a probe ``u`` of shape ``(B, C)``, independent across examples,
  with ``E[u_i] = 0`` and ``E[u_i u_iᵀ] = H_i``. Then ``‖Σ_i J_iᵀ u_i‖² / B`` is unbiased for
  ``T`` (cross terms vanish). MSE uses Rademacher probes; the cross-entropies use the
  sampled-label (Bartlett) construction ``u_i = p_i − e_{ŷ_i}`` with ``ŷ_i`` drawn from the model.
  A probe is made in two steps, ``probe(noise(key, shape), outputs, batch)``: the noise depends on
  the key and the shape alone, so a device holding rows ``[s, s + b)`` of a sharded batch can draw
  the noise of the whole batch and keep its rows, and its probes are those of one device holding
  the whole batch (:func:`kstep.gauss_newton_trace` with ``axis_name``);
* ``per_example(outputs, batch)``: for callables only, the user's per-example loss; its Hessian in
  the outputs gives Gauss–Newton-vector products.

Conventions (``docs/design.md``, "Setting and conventions"): ``"mse"`` is ℓ = ½ Σ_c (f_c − y_c)², so
``H_i = I`` and T is the NTK trace. A user whose MSE averages over classes or drops the ½ has
``H_i = I/C`` or ``2I``: pass the loss as a callable and the Hessian is derived from it.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PerExampleLoss = Callable[[Array, Any], Array]

LOSS_NAMES = ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")


@dataclasses.dataclass(frozen=True)
class OutputLoss:
  """A per-example loss described by its output Hessian.

  Attributes:
    name: a name for messages.
    hessian: ``(outputs (B, C), batch) -> (B, C, C)`` output-Hessian blocks.
    noise: ``(key, shape (B, C)) -> (B, C)`` the randomness of a probe, i.i.d. over entries, or
      ``None`` where no sampler exists (callables: use Gauss–Newton-vector products).
    probe: ``(noise (B, C), outputs (B, C), batch) -> (B, C)`` probes with ``E[u_i] = 0`` and
      ``E[u_i u_iᵀ] = H_i`` per example, row i made from row i of ``noise`` alone.
    per_example: ``(outputs (B, C), batch) -> (B,)`` the loss itself, or ``None`` for the named
      losses (their Hessians do not depend on labels, so no labels are needed).
    positions: the loss acts on the last axis alone, and every other axis of the outputs
      indexes an example: a sequence model's ``(B, T, V)`` logits are ``B·T`` rows of ``V``
      (``docs/design.md``, "Sequences").
  """

  name: str
  hessian: Callable[[Array, Any], Array]
  noise: Callable[[Array, tuple[int, ...]], Array] | None
  probe: Callable[[Array, Array, Any], Array] | None
  per_example: PerExampleLoss | None = None
  positions: bool = False

  def sample(self, key: Array, outputs: Array, batch: Any) -> Array:
    """Probes ``u`` (shape ``(B, C)``) with ``E[u_i u_iᵀ] = H_i``, independent across examples."""
    if self.noise is None:
      raise ValueError(f"loss {self.name!r} has no probe sampler; use Gauss–Newton products.")
    return self.probe(self.noise(key, outputs.shape), outputs, batch)

  def gnvp(self, outputs: Array, batch: Any, w: Array) -> Array:
    """Output-space product ``H_i w_i`` for every example (shape ``(B, C)``)."""
    if self.per_example is None:
      return jnp.einsum("bcd,bd->bc", self.hessian(outputs, batch), w)
    total = lambda o: jnp.sum(self.per_example(o, batch))
    return jax.jvp(jax.grad(total), (outputs.astype(jnp.float32),), (w,))[1]

  def for_output_shape(self, shape: tuple[int, ...]) -> "OutputLoss":
    """This loss on outputs flattened to ``(B, C)`` from the model's own ``shape``.

    The named losses work on ``(B, C)`` directly (``(B·T, C)`` rows for a loss with
    ``positions``, see :func:`rows_per_example`); a callable is handed its outputs back in the
    shape the model produced (``(B,)`` for scalar models).
    """
    if self.per_example is None:
      return self
    fn = self.per_example
    reshaped = lambda o, batch: fn(o.reshape(shape), batch)
    return OutputLoss(self.name, _callable_hessian(reshaped), None, None, reshaped)


def _mse_hessian(outputs: Array, batch: Any) -> Array:
  del batch
  b, c = outputs.shape
  return jnp.broadcast_to(jnp.eye(c, dtype=jnp.float32), (b, c, c))


def _rademacher(key: Array, shape: tuple[int, ...]) -> Array:
  return jax.random.rademacher(key, shape, dtype=jnp.float32)


def _mse_probe(noise: Array, outputs: Array, batch: Any) -> Array:
  del outputs, batch
  return noise


def _softmax_hessian(outputs: Array, batch: Any) -> Array:
  del batch
  p = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
  return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]


def _gumbel(key: Array, shape: tuple[int, ...]) -> Array:
  return jax.random.gumbel(key, shape, dtype=jnp.float32)


def _softmax_probe(noise: Array, outputs: Array, batch: Any) -> Array:
  del batch
  # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
  logits = outputs.astype(jnp.float32)
  y = jnp.argmax(logits + noise, axis=-1)
  return jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(y, outputs.shape[-1], dtype=jnp.float32)


def _sigmoid_hessian(outputs: Array, batch: Any) -> Array:
  del batch
  s = jax.nn.sigmoid(outputs.astype(jnp.float32))
  return jax.vmap(jnp.diag)(s * (1.0 - s))


def _uniform(key: Array, shape: tuple[int, ...]) -> Array:
  return jax.random.uniform(key, shape, dtype=jnp.float32)


def _sigmoid_probe(noise: Array, outputs: Array, batch: Any) -> Array:
  del batch
  s = jax.nn.sigmoid(outputs.astype(jnp.float32))
  return s - (noise < s).astype(jnp.float32)


def _callable_hessian(fn: PerExampleLoss) -> Callable[[Array, Any], Array]:
  def hessian(outputs: Array, batch: Any) -> Array:
    # The batch loss is a sum of per-example terms, so its output Hessian is block diagonal:
    # one product with e_c replicated over the batch returns column c of every block.
    c = outputs.shape[-1]
    total = lambda o: jnp.sum(fn(o, batch))
    grad = jax.grad(total)
    outputs32 = outputs.astype(jnp.float32)

    def column(e: Array) -> Array:
      tangent = jnp.broadcast_to(e, outputs32.shape)
      return jax.jvp(grad, (outputs32,), (tangent,))[1]

    cols = jax.vmap(column)(jnp.eye(c, dtype=jnp.float32))  # (C, B, C): [c, b, :] = H_b e_c
    return jnp.transpose(cols, (1, 2, 0))

  return hessian


def resolve_loss(loss: str | PerExampleLoss | OutputLoss, argname: str = "loss") -> OutputLoss:
  """Returns the ``OutputLoss`` for a loss name or a callable ``(outputs, batch) -> (B,)``.

  Raises:
    ValueError: ``loss`` is neither a known name nor callable.
  """
  if isinstance(loss, OutputLoss):
    return loss
  if isinstance(loss, str):
    if loss == "mse":
      return OutputLoss("mse", _mse_hessian, _rademacher, _mse_probe)
    if loss == "softmax_cross_entropy":
      return OutputLoss(loss, _softmax_hessian, _gumbel, _softmax_probe, positions=True)
    if loss == "sigmoid_binary_cross_entropy":
      return OutputLoss(loss, _sigmoid_hessian, _uniform, _sigmoid_probe)
    raise ValueError(
        f"`{argname}` must be one of {LOSS_NAMES} or a callable "
        f"(outputs, batch) -> per-example losses; got {loss!r}."
    )
  if callable(loss):
    name = getattr(loss, "__name__", "callable")
    return OutputLoss(name, _callable_hessian(loss), None, None, loss)
  raise ValueError(
      f"`{argname}` must be one of {LOSS_NAMES} or a callable "
      f"(outputs, batch) -> per-example losses; got {type(loss).__name__}."
  )


def rows_per_example(loss: OutputLoss | None, out_shape: tuple[int, ...]) -> int:
  """Rows an example's outputs make: the product of the axes between the first and the last
  for a loss with ``positions`` (T for ``(B, T, V)`` logits), else 1."""
  if loss is None or not loss.positions or len(out_shape) <= 2:
    return 1
  p = 1
  for d in out_shape[1:-1]:
    p *= d
  return p
