"""kstep: SGD that keeps its noise kernel norm K away from the stochastic edge of stability."""

from kstep.control import ScaleByKControlState, k_controlled_sgd, scale_by_k_control
from kstep.diagnostics import (
    TrackBatchSharpnessState,
    TrackKState,
    TrackLambdaMaxState,
    track_batch_sharpness,
    track_k,
    track_lambda_max,
)
from kstep.estimators import (
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
from kstep.fused import FusedProbe, value_and_grad
from kstep.hyperparams import inject_hyperparams
from kstep.noise_kernel import (
    k_exact,
    k_from_trace,
    k_high_dim,
    second_moment_growth,
)
from kstep.stats import stats

__version__ = "0.1.0"
