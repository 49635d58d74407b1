"""kstep: SGD and Adam that keep their noise kernel norm K away from the stochastic edge.

The public API is what this module exports, and ``kstep.flax`` (flax linen's ``TrainState``
for kstep; imports flax when used); everything under ``kstep._src`` is private.
"""

from kstep._src.control import ScaleByKControlState, k_controlled_sgd, scale_by_k_control
from kstep._src.diagnostics import (
    TrackBatchSharpnessState,
    TrackKState,
    TrackLambdaMaxState,
    track_batch_sharpness,
    track_k,
    track_lambda_max,
)
from kstep._src.estimators import (
    BatchSharpness,
    LambdaMax,
    OutputKernel,
    TraceEstimate,
    batch_sharpness,
    empirical_ntk,
    gauss_newton_lambda_max,
    gauss_newton_trace,
    gauss_newton_vp,
    hvp,
    lambda_max,
    ntk_trace,
    output_kernel,
)
from kstep._src.fused import FusedProbe, value_and_grad
from kstep._src.hyperparams import inject_hyperparams
from kstep._src.noise_kernel import (
    curvature_edge,
    k_exact,
    k_from_trace,
    k_high_dim,
    second_moment_growth,
)
from kstep._src.options import Estimate, Guard
from kstep._src.preconditioned import (
    PreconditionedKControlState,
    k_controlled_adam,
    scale_by_preconditioned_k_control,
)
from kstep._src.preconditioners import Preconditioner, adam_preconditioner, rms_preconditioner
from kstep._src.stats import stats

__version__ = "0.1.0"


def __getattr__(name: str):
  # kstep.flax imports flax, an optional dependency: loaded on first use of ``kstep.flax``.
  if name == "flax":
    import importlib

    return importlib.import_module("kstep.flax")
  raise AttributeError(f"module 'kstep' has no attribute {name!r}")
