"""Curvature estimators: traces, the output kernel, curvature products, λ_max, Batch Sharpness.

One module per job, read top-down: :mod:`~kstep._src.estimators.traces` (Gauss–Newton / NTK traces,
empirical NTK), :mod:`~kstep._src.estimators.output_kernels` (the C×C output kernel M),
:mod:`~kstep._src.estimators.products` (Hessian- and Gauss–Newton-vector products),
:mod:`~kstep._src.estimators.eigensolvers` (λ_max), :mod:`~kstep._src.estimators.sharpness`
(Batch Sharpness); helpers in :mod:`~kstep._src.estimators.tree_math`,
:mod:`~kstep._src.estimators.data_axis` and :mod:`~kstep._src.estimators.sample_stats`.

All functions are pure and jit-compatible, take an explicit PRNG key where they sample, accept
params of any pytree structure and any float dtype, and accumulate in float32 (bf16/f16 params give
float32 estimates). Per-example work is chunked with ``jax.lax.map(..., batch_size=chunk_size)`` so
memory stays bounded.

Shapes: ``apply_fn(params, batch)`` returns outputs of shape ``(B, C)`` or ``(B,)``; every leaf of
``batch`` has the examples on its leading axis (needed only for ``method="exact"``, which evaluates
the model one example at a time).

Data parallelism. Under ``jax.jit`` with the batch sharded over a mesh (``NamedSharding``; params
replicated or sharded) nothing changes: probes are drawn at the global batch's shape and the
compiler inserts the reductions. Inside ``jax.shard_map`` or ``jax.pmap`` each device sees its own
shard: pass ``axis_name`` (the mapped axis, or a tuple of axes, the batch is split over) and the
estimators combine the devices with collectives over it. Params must then be the same on every
device along ``axis_name``, shards must have equal size, and ``loss_fn`` returns the mean loss of
the local shard (the global loss is the mean over devices). With the same key, the estimate on a
sharded batch equals the single-device estimate on the whole batch (up to float rounding).
"""

from kstep._src.estimators.data_axis import PROBE_SCOPES, AxisName, check_probe_scope
from kstep._src.estimators.eigensolvers import (
    EIGEN_METHODS,
    LambdaMax,
    gauss_newton_lambda_max,
    lambda_max,
)
from kstep._src.estimators.linearization import LinearizedModel, linearize
from kstep._src.estimators.output_kernels import OutputKernel, output_kernel
from kstep._src.estimators.products import batch_curvature, gauss_newton_vp, hvp
from kstep._src.estimators.sample_stats import mean_and_stderr, ratio_of_means
from kstep._src.estimators.sharpness import BatchSharpness, batch_sharpness
from kstep._src.estimators.traces import (
    METHODS,
    TraceEstimate,
    empirical_ntk,
    gauss_newton_trace,
    ntk_trace,
)
from kstep._src.estimators.tree_math import random_unit
