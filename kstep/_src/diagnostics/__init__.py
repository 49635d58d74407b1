"""Pass-through diagnostics: λ_max, Batch Sharpness and K of any optimizer, measured inside jit.

Each function here returns an ``optax.GradientTransformationExtraArgs`` that returns its
``updates`` unchanged (the same arrays, bit for bit) and records measurements in its state, a
NamedTuple of scalar arrays whose class attribute ``STATS_FIELDS`` names what it reports. Chain it
before or after any optimizer and read the values with :func:`kstep.stats` or
``optax.tree.get(state, name)``; here on a linear least-squares model, whose Hessian is
``XᵀX / B``:

>>> import jax, jax.numpy as jnp, optax, kstep
>>> apply_fn = lambda p, batch: batch["x"] @ p["w"]
>>> loss_fn = lambda p, batch: 0.5 * jnp.mean(jnp.sum((apply_fn(p, batch) - batch["y"]) ** 2, -1))
>>> batch = {"x": jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0])), "y": jnp.ones((4, 1))}
>>> params = {"w": jnp.zeros((4, 1))}
>>> opt = optax.chain(
...     optax.sgd(0.05, momentum=0.9),
...     kstep.track_lambda_max(loss_fn, every=50, learning_rate=0.05, momentum=0.9),
...     kstep.track_batch_sharpness(loss_fn, every=5, learning_rate=0.05, momentum=0.9),
... )
>>> state = opt.init(params)
>>> grads = jax.grad(loss_fn)(params, batch)
>>> updates, state = opt.update(grads, state, params, batch=batch)
>>> s = kstep.stats(state)
>>> round(float(s["lambda_max"]), 4)  # the top of XᵀX / B = diag(1, 4, 9, 16) / 4
4.0
>>> round(float(optax.tree.get(state, "lambda_max_edge_ratio")), 4)  # 0.05 · 4 / (2 · 1.9)
0.0526
>>> round(float(s["batch_sharpness"]), 4)  # gᵀHg / ‖g‖² with g ∝ (1, 2, 3, 4): 354 / 120
2.95
>>> round(float(s["batch_sharpness_edge_ratio_small_batch"]), 4)  # 0.05 · 2.95 / (2 · 0.1)
0.7375
>>> round(float(s["batch_sharpness_edge_ratio_large_batch"]), 4)  # 0.05 · 2.95 / (2 · 1.9)
0.0388

``update`` needs ``params`` (the parameters the gradients were taken at) and the extra keyword
``batch=`` (``optax.chain`` forwards extra keywords to every member); :func:`track_lambda_max`
also accepts a fixed ``measure_batch=`` (e.g. the whole training set). Measurements happen on
update 0, ``every``, ``2·every``, … inside a ``lax.cond``: nothing leaves the device and the other
updates cost nothing beyond a few scalar operations. A measurement that comes out NaN or ±Inf is
dropped: the reported values keep their previous values (NaN before the first valid measurement:
never a plausible-looking 0) and ``*_num_skipped`` counts it.

Names are unique across the three trackers, so all three fit in one chain. The K controller
(:func:`kstep.scale_by_k_control`) also reports ``k``: with both in one state, :func:`kstep.stats`
raises, and each value must be read from its own sub-state (a controlled run has no use for
:func:`track_k` anyway).

Data parallel: under ``jax.jit`` with a sharded batch the trackers need nothing; inside
``shard_map``/``pmap`` pass ``axis_name`` (the axis the batch is split over) and they measure on
the global batch, the same numbers as one device (see :mod:`kstep._src.estimators`).

Under ``optax.inject_hyperparams``, list ``loss_fn`` / ``apply_fn`` (and a callable ``loss``) in
``static_args`` (it treats every callable as a schedule), and ``num_iters`` / ``num_probes`` too:
they set shapes, and a traced value raises an error saying so. The other numbers (``every``,
``learning_rate``, ``decay``, ``tol``, ``momentum``, ``batch_size``) may be injected: ``init``
checks their concrete values, a jitted ``update`` uses them traced, unchecked.

Running means (:func:`track_batch_sharpness`, :func:`track_k`) are exponentially weighted: after n
measurements x_1 … x_n the mean is ``Σ_i d^(n−i) x_i / Σ_i d^(n−i)`` with ``d = decay``, i.e. a
debiased EMA that averages about ``(1 + d)/(1 − d)`` measurements; ``decay=None`` gives every
measurement equal weight (the all-time mean). Standard errors treat the measurements as
independent (true for the batches, not for the drifting parameters): ``sqrt(v · Σw²) / Σw`` with
``v`` the weighted sample variance, debiased as for reliability weights (``ddof=1`` when
``decay=None``); NaN until two measurements exist.
"""

from kstep._src.diagnostics.batch_sharpness_tracker import (
    TrackBatchSharpnessState,
    track_batch_sharpness,
)
from kstep._src.diagnostics.k_tracker import TrackKState, track_k
from kstep._src.diagnostics.lambda_max_tracker import TrackLambdaMaxState, track_lambda_max
