"""kstep with flax linen's ``TrainState``. Imports flax, an optional dependency, when used.

``flax.training.train_state.TrainState.apply_gradients(grads=...)`` calls ``tx.update(grads,
opt_state, params)`` and forwards nothing else, but kstep's controller estimates K on the batch
the gradients came from. :class:`TrainState` is flax's with ``apply_gradients(*, grads, batch,
probe=None, **kwargs)``; everything else (``create``, ``replace``, serialisation) is flax's.
"""

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's ``TrainState`` whose ``apply_gradients`` hands ``batch`` to the optimizer.

  Use it in place of ``flax.training.train_state.TrainState`` when ``tx`` is
  :func:`kstep.k_controlled_sgd` (or any chain holding :func:`kstep.scale_by_k_control`).
  For a model with BatchNorm keep ``batch_stats`` in a field of your own subclass, as in flax's
  examples, and see ``docs/batchnorm.md`` for the ``apply_fn`` to give kstep.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, kstep
    >>> from kstep.flax import TrainState
    >>> model = nn.Dense(2)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
    >>> params = model.init(jax.random.PRNGKey(0), batch["x"])["params"]
    >>> apply_fn = lambda p, b: model.apply({"params": p}, b["x"])
    >>> state = TrainState.create(apply_fn=model.apply, params=params,
    ...                           tx=kstep.k_controlled_sgd(0.1, apply_fn=apply_fn))
    >>> loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply_fn(p, batch) - batch["y"]) ** 2, -1))
    >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params), batch=batch)
    >>> int(state.step), int(kstep.stats(state.opt_state)["k_num_estimates"])
    (1, 1)
  """

  def apply_gradients(self, *, grads: Any, batch: Any, probe: Any = None, **kwargs: Any):
    """``step + 1`` and the params and optimizer state after ``tx.update``.

    Args:
      grads: gradients shaped like ``params``.
      batch: the batch the gradients came from (kstep estimates K on it).
      probe: the fused path's probe (:func:`kstep.value_and_grad`), or ``None``.
      **kwargs: other fields to ``replace`` (e.g. ``batch_stats``).

    Returns:
      The updated state.
    """
    extra = {"batch": batch} if probe is None else {"batch": batch, "probe": probe}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
