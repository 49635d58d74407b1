"""BatchNorm and the two edges of stability: which function of the parameters kstep should see.

With BatchNorm an example's output depends on the rest of its batch, and the model carries
``batch_stats`` beside its parameters. kstep linearises ``apply_fn(params, batch)`` on a probe
sub-batch. This benchmark trains a small BatchNorm CNN (:class:`BNCNN`) on scikit-learn's digits
(all 1,797 images, standardised) with constant-LR ``optax.sgd(η, momentum=0.9)``, BatchNorm in
train mode, and for each batch size B and seed runs a grid of steps η (factor √2) to find two
edges:

* divergence: the batch loss not finite, or its 10-step mean above 10× the initial loss
  (refined by bisection between the last stable and the first divergent grid step);
* failure: divergence, or a final training-set accuracy below half the grid's best (BatchNorm
  nets above the small-batch edge collapse to a near-constant predictor instead of diverging).

For each candidate ``apply_fn`` it measures at θ₀ (first batch) the Gauss–Newton trace T and top
eigenvalue λ_max, hence K per output ``η/(2(1−μ)B)·T/C`` (the total ``η/(2(1−μ)B)·T`` for
cross-entropy) and ``η·λ_max/(2(1+μ))`` at the steps around both edges, and the same along the
runs at the largest stable step and the largest step that trains:

* ``a_running``: eval mode on the running statistics (``use_running_average=True``);
* ``b_probe``: train mode on the probe rows (every ``B // 16``-th row, their own statistics);
* ``b_batch``: train mode on the whole batch;
* ``c_batch_stats``: eval mode on the whole batch's own statistics, held fixed (no gradient
  through them): train mode's outputs, without its dependence of the statistics on θ.

T comes from :func:`kstep.gauss_newton_trace` (exact for ``a`` and ``c``, whose outputs are
per-example functions; Hutchinson on the batch function for ``b``, 256/128 probes), λ_max from
:func:`kstep.gauss_newton_lambda_max` (Lanczos, 20 products); both on the whole batch, except
``b_probe`` on its rows. Command (one CPU core)::

    taskset -c 0 python -m benchmarks.batchnorm_edge [--out DIR] [--quick] [--losses mse,ce]

Raw JSONs (one per loss, B and seed) go to ``--out`` (default ``benchmarks/runs/batchnorm_edge/``,
git-ignored), the tables to ``benchmarks/results/batchnorm_edge/summary.md`` (``--out``'s folder
for another ``--out`` or ``--quick``). Existing JSONs are kept (``--force`` reruns them). The
results and the recommended ``apply_fn``: ``docs/batchnorm.md``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kstep
from benchmarks import results_io

MOMENTUM = 0.9  # heavy-ball μ of the SGD
BN_MOMENTUM = 0.9  # BatchNorm's running-average momentum (PyTorch's default 0.1 in its units)
PROBE_ROWS = 16  # kstep's default probe_batch_size
CANDIDATES = ("a_running", "b_probe", "b_batch", "c_batch_stats")
KSTEP_LOSS = {"mse": "mse", "ce": "softmax_cross_entropy"}
DIVERGE_FACTOR = 10.0  # a run diverges when its smoothed batch loss exceeds this × the initial
SMOOTH = 10  # steps in the trailing mean of the batch loss
SEGMENT = 5  # steps per jitted lax.scan chunk; measurements fall on chunk boundaries
TRAIN_FRACTION = 0.5  # a run trains when its final accuracy is at least this × the grid's best
GRID = tuple(0.0125 * 2 ** (k / 2) for k in range(14))  # 0.0125 … 1.13, factor √2
QUICK_GRID = tuple(0.025 * 2 ** k for k in range(7))  # 0.025 … 1.6, factor 2
MEASURE_AT = (0, 10, 25, 50, 100, 200)
DEFAULT_OUT = results_io.RUNS_DIR / "batchnorm_edge"
SUMMARY_DIR = results_io.RESULTS_DIR / "batchnorm_edge"

PyTree = Any


class Conv3x3(nn.Module):
  """3×3 convolution, stride 1, zero padding 1, no bias, as patches times a dense kernel.

  The same function as ``nn.Conv(features, (3, 3), padding=1, use_bias=False)`` with its kernel
  reshaped to ``(9·C_in, features)``; on CPU, XLA's convolutions inside ``lax.scan`` run 10–20×
  slower than this matrix product.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
    return nn.Dense(self.features, use_bias=False)(patches)


class BNCNN(nn.Module):
  """conv 3×3 – BatchNorm – ReLU per width, global average pool, dense ``num_classes``."""

  widths: tuple[int, ...] = (16, 32)
  num_classes: int = 10
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    for width in self.widths:
      x = Conv3x3(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 digits as ``(N, 8, 8, 1)`` float32, each pixel standardised over the
  images (a constant pixel left at 0), and the integer labels."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  std = x.std(0)
  x = (x - x.mean(0)) / np.where(std > 0, std, 1.0)
  return x.reshape(-1, 8, 8, 1).astype(np.float32), y.astype(np.int32)


def per_example_loss(loss: str, outputs: jax.Array, onehot: jax.Array) -> jax.Array:
  """``"mse"``: ½ Σ_c (f_c − onehot_c)² (kstep's ``"mse"``); ``"ce"``: softmax cross-entropy."""
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(outputs - onehot), axis=-1)
  return optax.softmax_cross_entropy(outputs, onehot)


def batch_statistics(model: BNCNN, params: PyTree, batch_stats: PyTree, x: jax.Array) -> PyTree:
  """The mean and variance every BatchNorm computes on ``x`` in train mode, in the layout of
  ``batch_stats`` (whose values are not used): a running average with momentum 0."""
  _, new = model.clone(bn_momentum=0.0).apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
  return new["batch_stats"]


def eval_apply(model: BNCNN, batch_stats: PyTree) -> Callable[[PyTree, jax.Array], jax.Array]:
  """``apply_fn(params, x)`` in eval mode on the given statistics (candidates a and c)."""
  return lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)


def train_apply(model: BNCNN, batch_stats: PyTree) -> Callable[[PyTree, jax.Array], jax.Array]:
  """``apply_fn(params, x)`` in train mode: normalised with the statistics of the rows given
  (candidate b); ``batch_stats`` only fills the mutable collection."""
  return lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])[0]


def probe_rows(x: jax.Array, probe_rows: int = PROBE_ROWS) -> jax.Array:
  """kstep's probe sub-batch: every ``B // probe_rows``-th row (the whole batch if B ≤ that)."""
  b = x.shape[0]
  return x if b <= probe_rows else x[:: b // probe_rows]


def make_segment(model: BNCNN, loss: str):
  """Jitted ``(carry, idx, lr, x, onehot) -> (carry, batch losses)``: ``len(idx)`` steps of
  ``optax.sgd(lr, momentum=MOMENTUM)`` with BatchNorm in train mode, carry = (params,
  batch_stats, optimizer state), ``idx`` the ``(steps, B)`` row indices of the batches."""

  def segment(carry, idx, lr, x, onehot):
    opt = optax.sgd(lr, momentum=MOMENTUM)

    def step(c, rows):
      params, stats, opt_state = c

      def loss_fn(p):
        out, new = model.apply({"params": p, "batch_stats": stats}, x[rows], train=True,
                               mutable=["batch_stats"])
        return jnp.mean(per_example_loss(loss, out, onehot[rows])), new["batch_stats"]

      (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats, opt_state), value

    return jax.lax.scan(step, carry, idx)

  return jax.jit(segment)


def divergence_step(losses: np.ndarray, initial: float) -> int | None:
  """The first step whose batch loss is not finite or whose trailing ``SMOOTH``-step mean exceeds
  ``DIVERGE_FACTOR × initial``; None if none."""
  losses = np.asarray(losses, np.float64)
  bad = ~np.isfinite(losses)
  csum = np.cumsum(np.where(bad, 0.0, losses))
  n = np.arange(1, len(losses) + 1)
  lo = np.maximum(n - SMOOTH, 0)
  window = csum - np.where(lo > 0, csum[lo - 1], 0.0)
  mean = window / (n - lo)
  hit = np.flatnonzero(bad | (mean > DIVERGE_FACTOR * initial))
  return int(hit[0]) if hit.size else None


def make_measure(model: BNCNN, loss: str, batch_size: int, probes: dict[str, int],
                 lanczos_iters: int):
  """Jitted ``(params, running_stats, x_batch, key, lr) -> dict``: per candidate the trace T (and
  its standard error), λ_max of the Gauss–Newton matrix, K and η·λ_max/E(μ)."""
  kloss = KSTEP_LOSS[loss]
  edge = kstep.curvature_edge(MOMENTUM)

  def measure(params, running, xb, key, lr):
    stats = jax.lax.stop_gradient(batch_statistics(model, params, running, xb))
    rows = probe_rows(xb)
    cases = {
        "a_running": (eval_apply(model, running), xb, "exact"),
        "b_probe": (train_apply(model, running), rows, "hutchinson"),
        "b_batch": (train_apply(model, running), xb, "hutchinson"),
        "c_batch_stats": (eval_apply(model, stats), xb, "exact"),
    }
    out = {}
    keys = jax.random.split(key, 2 * len(cases) + 2)
    c = model.num_classes
    for n, (name, (fn, x, method)) in enumerate(cases.items()):
      if method == "exact":
        tr = kstep.gauss_newton_trace(fn, params, x, loss=kloss, method="exact")
      else:
        tr = kstep.gauss_newton_trace(fn, params, x, loss=kloss, key=keys[2 * n],
                                      num_probes=probes[name])
      lam = kstep.gauss_newton_lambda_max(fn, params, x, loss=kloss, num_iters=lanczos_iters,
                                          key=keys[2 * n + 1])
      scale = tr.value / c if loss == "mse" else tr.value
      out[name] = {
          "trace": tr.value, "trace_stderr": tr.stderr, "lambda_max": lam.value,
          "lambda_residual": lam.residual,
          "k": kstep.k_from_trace(lr, batch_size, scale, MOMENTUM),
          "curvature_ratio": lr * lam.value / edge,
      }
    # What kstep's guard would see for a and c: λ_max on the probe rows only.
    for n, name in enumerate(("a_running", "c_batch_stats")):
      fn = cases[name][0]
      lam = kstep.gauss_newton_lambda_max(fn, params, rows, loss=kloss, num_iters=lanczos_iters,
                                          key=keys[-1 - n])
      out[name]["curvature_ratio_probe_rows"] = lr * lam.value / edge
    return out

  return jax.jit(measure)


class Experiment:
  """One loss and batch size: the data, the jitted training chunk, final metrics and
  measurement."""

  def __init__(self, loss: str, batch_size: int, steps: int, probes: dict[str, int],
               lanczos_iters: int):
    self.loss, self.batch_size, self.steps = loss, batch_size, steps
    x, y = digits()
    self.x, self.onehot = jnp.asarray(x), jax.nn.one_hot(y, 10)
    self.model = BNCNN()
    self.segment = make_segment(self.model, loss)
    self.measure = make_measure(self.model, loss, batch_size, probes, lanczos_iters)

    def final(params, stats):
      out = train_apply(self.model, stats)(params, self.x)
      loss_value = jnp.mean(per_example_loss(loss, out, self.onehot))
      acc = jnp.mean(jnp.argmax(out, -1) == jnp.argmax(self.onehot, -1))
      return loss_value, acc

    self.final = jax.jit(final)

  def start(self, seed: int) -> tuple[tuple, np.ndarray, float]:
    """Initial carry, the ``(steps, B)`` batch indices (drawn without replacement within a
    batch, independently across steps) and the initial loss (train mode, all images)."""
    variables = self.model.init(jax.random.PRNGKey(seed), self.x[:2], train=False)
    params, stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(1000 + seed)
    n = self.x.shape[0]
    idx = np.stack([rng.choice(n, self.batch_size, replace=False) for _ in range(self.steps)])
    initial = float(self.final(params, stats)[0])
    carry = (params, stats, optax.sgd(1.0, momentum=MOMENTUM).init(params))
    return carry, idx.astype(np.int32), initial

  def measure_init(self, seed: int) -> dict[str, dict[str, float]]:
    """Every candidate's estimates at θ₀ on the first batch, K and η·λ_max/E at η = 1 (both
    are linear in η)."""
    (params, stats, _), idx, _ = self.start(seed)
    m = self.measure(params, stats, self.x[idx[0]], jax.random.PRNGKey(10_000 + seed),
                     jnp.float32(1.0))
    return jax.tree.map(float, m)

  def run(self, seed: int, lr: float, measure_at: tuple[int, ...] = ()) -> dict[str, Any]:
    """Trains at ``lr`` for ``steps`` steps (fewer: stops at divergence, or after the last
    measurement when measuring).

    Returns the divergence step (None if none), the initial loss, the final loss and accuracy
    on all images (train mode; NaN after divergence) and the measurements at the steps
    ``measure_at`` (multiples of ``SEGMENT``) reached before divergence.
    """
    carry, idx, initial = self.start(seed)
    losses: list[float] = []
    points = []
    key = jax.random.PRNGKey(seed)
    for start in range(0, self.steps, SEGMENT):
      if start in measure_at:
        params, stats, _ = carry
        m = self.measure(params, stats, self.x[idx[start]], jax.random.fold_in(key, start),
                         jnp.float32(lr))
        points.append({"step": start, **jax.tree.map(float, m)})
      if measure_at and start >= max(measure_at):
        break
      carry, seg = self.segment(carry, idx[start:start + SEGMENT], jnp.float32(lr), self.x,
                                self.onehot)
      losses.extend(np.asarray(seg).tolist())
      if divergence_step(np.array(losses), initial) is not None:
        break
    div = divergence_step(np.array(losses), initial)
    final_loss, final_acc = (float("nan"),) * 2
    if div is None and not measure_at:
      final_loss, final_acc = (float(v) for v in self.final(*carry[:2]))
    return {"lr": lr, "diverged_at": div, "initial_loss": initial, "final_loss": final_loss,
            "final_acc": final_acc, "steps_done": len(losses), "measurements": points}


def search(run: Callable[[float], dict[str, Any]], grid: tuple[float, ...], bisections: int
           ) -> dict[str, Any]:
  """Both edges from runs on ``grid`` (ascending, a constant factor apart; extended upward until
  a run diverges), the divergence edge refined by ``bisections`` bisections in log space.

  Returns ``lr_stable``/``lr_divergent`` (the largest stable and smallest divergent step) and
  ``lr_trains``/``lr_fails``: the grid step below the first that fails, where failing is
  diverging or ending below ``TRAIN_FRACTION`` × the best final accuracy on the grid (the
  collapse to a near-constant predictor that BatchNorm shows instead of divergence); and the
  runs (without measurements).
  """
  factor = grid[1] / grid[0]
  runs: dict[float, dict[str, Any]] = {}
  lrs = list(grid)
  i = 0
  while True:
    if i == len(lrs):
      if lrs[-1] > 1e3:
        raise RuntimeError(f"stable at every step up to {lrs[-1]:g}")
      lrs.append(lrs[-1] * factor)
    runs[lrs[i]] = run(lrs[i])
    if runs[lrs[i]]["diverged_at"] is not None:
      break
    i += 1
  if i == 0:
    raise RuntimeError(f"the grid's smallest step {lrs[0]:g} diverges")
  lo, hi = lrs[i - 1], lrs[i]
  for _ in range(bisections):
    mid = math.sqrt(lo * hi)
    runs[mid] = run(mid)
    if runs[mid]["diverged_at"] is not None:
      hi = mid
    else:
      lo = mid
  on_grid = [runs[lr] for lr in lrs[: i + 1]]
  best = max(r["final_acc"] for r in on_grid[:-1])
  fails = [r["diverged_at"] is not None or r["final_acc"] < TRAIN_FRACTION * best
           for r in on_grid]
  j = fails.index(True)
  return {"lr_stable": lo, "lr_divergent": hi,
          "lr_trains": on_grid[j - 1]["lr"] if j > 0 else float("nan"),
          "lr_fails": on_grid[j]["lr"], "best_acc": best,
          "runs": [{k: v for k, v in r.items() if k != "measurements"}
                   for _, r in sorted(runs.items())]}


def one_case(exp: Experiment, seed: int, grid: tuple[float, ...], bisections: int,
             measure_at: tuple[int, ...]) -> dict[str, Any]:
  """The edges of one (loss, B, seed), the estimates at θ₀, and along the runs at the largest
  stable step and at the largest step that trains."""
  t0 = time.perf_counter()

  def run(lr: float) -> dict[str, Any]:
    r = exp.run(seed, lr)
    state = (f"diverged at step {r['diverged_at']}" if r["diverged_at"] is not None else
             f"loss {r['final_loss']:.3f}, accuracy {r['final_acc']:.3f}")
    print(f"  {exp.loss} B={exp.batch_size} seed={seed} lr={lr:.4g}: {state}", flush=True)
    return r

  case = search(run, grid, bisections)
  t_search = time.perf_counter() - t0
  case["init"] = exp.measure_init(seed)
  case["along"] = {"stable": exp.run(seed, case["lr_stable"], measure_at)}
  if np.isfinite(case["lr_trains"]):
    case["along"]["trains"] = exp.run(seed, case["lr_trains"], measure_at)
  case.update({"loss": exp.loss, "batch_size": exp.batch_size, "seed": seed,
               "steps": exp.steps,
               "wall_s": {"search": t_search, "total": time.perf_counter() - t0}})
  return case


SHORT = {"a_running": "a: eval, running stats", "b_probe": "b: train, probe rows",
         "b_batch": "b: train, whole batch", "c_batch_stats": "c: eval, batch's stats"}


def _range(vals: list[float], fmt: str = "{:.2f}") -> str:
  """``lo–hi`` of the finite values (one number where they print the same; – if none)."""
  vals = [v for v in vals if np.isfinite(v)]
  if not vals:
    return "–"
  lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
  return lo if lo == hi else f"{lo}–{hi}"


def _bracket(low: list[float], high: list[float], fmt: str = "{:.2f}") -> str:
  """``[min of low, max of high]``: where the edge lies over the seeds."""
  low, high = [v for v in low if np.isfinite(v)], [v for v in high if np.isfinite(v)]
  if not low or not high:
    return "–"
  return f"[{fmt.format(min(low))}, {fmt.format(max(high))}]"


def after_transient(run: dict[str, Any], name: str, field: str) -> tuple[float, float]:
  """Median and max of one candidate's ``field`` over a run's measurements after step 0."""
  vals = [p[name][field] for p in run["measurements"] if p["step"] > 0]
  if not vals:
    return float("nan"), float("nan")
  return float(np.median(vals)), float(np.max(vals))


def tables(cases: list[dict[str, Any]]) -> list[str]:
  """The summary's three markdown tables (see :func:`write_summary`)."""
  groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
  for case in cases:
    groups.setdefault((case["loss"], case["batch_size"]), []).append(case)
  order = sorted(groups, key=lambda k: (k[0] != "mse", k))
  edges = ["| loss | B | seeds | η trains | η fails | η stable | η divergent | accuracy at η "
           "trains | accuracy at η stable |", "|" + " --- |" * 9]
  for key in order:
    g = groups[key]
    acc = lambda c, lr: next((r["final_acc"] for r in c["runs"] if r["lr"] == lr), math.nan)
    edges.append("| " + " | ".join([
        key[0], str(key[1]), str(len(g)),
        _range([c["lr_trains"] for c in g], "{:.3g}"), _range([c["lr_fails"] for c in g], "{:.3g}"),
        _range([c["lr_stable"] for c in g], "{:.3g}"),
        _range([c["lr_divergent"] for c in g], "{:.3g}"),
        _range([acc(c, c["lr_trains"]) for c in g]), _range([acc(c, c["lr_stable"]) for c in g]),
    ]) + " |")
  init = ["| loss | B | candidate | K at the collapse edge | K at the divergence edge | ηλ/E at "
          "the collapse edge | ηλ/E at the divergence edge |", "|" + " --- |" * 7]
  for key in order:
    g = groups[key]
    for name in CANDIDATES:
      cell = lambda field, lo, hi: _bracket([c[lo] * c["init"][name][field] for c in g],
                                            [c[hi] * c["init"][name][field] for c in g])
      init.append("| " + " | ".join([
          key[0], str(key[1]), SHORT[name],
          cell("k", "lr_trains", "lr_fails"), cell("k", "lr_stable", "lr_divergent"),
          cell("curvature_ratio", "lr_trains", "lr_fails"),
          cell("curvature_ratio", "lr_stable", "lr_divergent"),
      ]) + " |")
  along = ["| loss | B | candidate | K at η trains | ηλ/E at η trains | K at η stable | ηλ/E at "
           "η stable |", "|" + " --- |" * 7]
  for key in order:
    g = groups[key]
    for name in CANDIDATES:
      cells = [key[0], str(key[1]), SHORT[name]]
      for side in ("trains", "stable"):
        for field in ("k", "curvature_ratio"):
          stats = [after_transient(c["along"][side], name, field) for c in g
                   if side in c["along"]]
          cells.append(f"{_range([s[0] for s in stats])} (max {_range([s[1] for s in stats])})")
      along.append("| " + " | ".join(cells) + " |")
  return ["\n".join(edges), "\n".join(init), "\n".join(along)]


def write_summary(out: pathlib.Path, summary_path: pathlib.Path, command: str) -> str:
  """Writes ``summary.md`` from the JSONs in ``out``; returns its text ("" if none)."""
  cases = [results_io.load_json(p) for p in sorted(out.glob("*_B=*_seed=*.json"))]
  if not cases:
    return ""
  env = cases[0].get("env", {})
  steps = sorted({c["steps"] for c in cases})
  measure_at = sorted({p["step"] for c in cases for r in c["along"].values()
                       for p in r["measurements"]})
  wall = sum(c["wall_s"]["total"] for c in cases)
  commands = sorted({c.get("env", {}).get("command") or command for c in cases})
  edges, init, along = tables(cases)
  edge = float(kstep.curvature_edge(MOMENTUM))
  text = "\n".join([
      "# BatchNorm CNN on digits: where constant-LR SGD fails, and K, η·λ_max/E there",
      "",
      "Commands: " + ", ".join(f"`taskset -c 0 {c}`" for c in commands) + ". Machine: "
      f"{env.get('cpu_count')}-core {env.get('cpu_model') or 'CPU'} ({env.get('platform')}), "
      f"one core; jax {env.get('jax')}, optax {env.get('optax')}, git "
      f"{((env.get('git') or {}).get('commit') or '')[:10]}; {wall / 60:.1f} min in all.",
      "",
      f"`optax.sgd(η, momentum={MOMENTUM})` at constant η, BatchNorm in train mode (running "
      f"averages with momentum {BN_MOMENTUM}), {'/'.join(map(str, steps))} steps, batches drawn "
      "without replacement, one independent draw per step. A run diverges when its batch loss "
      f"is not finite or its {SMOOTH}-step mean exceeds {DIVERGE_FACTOR:g}× the initial loss; "
      f"it fails when it diverges or ends below {TRAIN_FRACTION:g}× the best final accuracy of "
      "the grid (training-set accuracy, train mode on all images). η trains / fails: the "
      "grid steps (factor √2) on either side of the first failure; η stable / divergent: the "
      "same for divergence, refined by bisection. Ranges: over seeds.",
      "",
      edges,
      "",
      f"At θ₀ (the first batch), K and η·λ_max/E (E = 2(1 + μ) = {edge:.1f}) at the two steps "
      "around each edge: [the smaller over seeds at the step below, the larger at the step "
      "above]. K per output (T/C) for MSE, total for cross-entropy. Candidates: a = eval mode "
      "on the running statistics; b = train mode on the rows given: the "
      f"{PROBE_ROWS} probe rows or the whole batch; c = eval mode on the whole batch's own "
      "statistics, held fixed.",
      "",
      init,
      "",
      f"Along the runs at η trains and η stable, after step 0 (steps {measure_at[1:]}): median "
      "(and max) over the steps, ranges over seeds.",
      "",
      along,
      "",
  ])
  summary_path.parent.mkdir(parents=True, exist_ok=True)
  summary_path.write_text(text)
  return text


def cpu_model() -> str | None:
  """The CPU's model name from /proc/cpuinfo (None where there is none)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help="folder of the raw JSONs (default benchmarks/runs/batchnorm_edge)")
  parser.add_argument("--quick", action="store_true",
                      help="B = 8, 128; one seed; 100 steps; a factor-2 grid; few probes")
  parser.add_argument("--losses", default="mse", help="comma list of mse,ce")
  parser.add_argument("--batch-sizes", default=None, help="comma list (default 2,8,32,128,512)")
  parser.add_argument("--seeds", default=None, help="comma list (default 0,1)")
  parser.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
  parser.add_argument("--force", action="store_true", help="rerun cases whose JSON exists")
  args = parser.parse_args(argv)
  quick = args.quick
  default_b = "8,128" if quick else "2,8,32,128,512"
  batch_sizes = [int(b) for b in (args.batch_sizes or default_b).split(",")]
  seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1")).split(",")]
  steps = args.steps or (100 if quick else 300)
  grid = QUICK_GRID if quick else GRID
  bisections = 1 if quick else 2
  measure_at = tuple(t for t in ((0, 10, 50) if quick else MEASURE_AT) if t < steps)
  probes = {"b_probe": 64 if quick else 256, "b_batch": 32 if quick else 128}
  lanczos_iters = 10 if quick else 20
  default_out = args.out.resolve() == DEFAULT_OUT.resolve()
  summary_path = (SUMMARY_DIR if default_out and not quick else args.out) / "summary.md"
  command = "python -m benchmarks.batchnorm_edge" + "".join(
      " " + a for a in (sys.argv[1:] if argv is None else argv))

  for loss in args.losses.split(","):
    for b in batch_sizes:
      exp = None
      for seed in seeds:
        path = args.out / f"{loss}_B={b}_seed={seed}.json"
        if path.exists() and not args.force:
          print(f"{path} exists (--force reruns it)")
          continue
        exp = exp or Experiment(loss, b, steps, probes, lanczos_iters)
        case = one_case(exp, seed, grid, bisections, measure_at)
        env = results_io.environment()
        env["command"] = command
        env["cpu_model"] = cpu_model()
        case["env"] = env
        case["config"] = {"momentum": MOMENTUM, "bn_momentum": BN_MOMENTUM,
                          "probe_rows": PROBE_ROWS, "probes": probes, "grid": grid,
                          "bisections": bisections, "lanczos_iters": lanczos_iters,
                          "measure_at": measure_at, "diverge_factor": DIVERGE_FACTOR,
                          "smooth": SMOOTH, "train_fraction": TRAIN_FRACTION}
        results_io.save_json(path, case)
        print(f"{loss} B={b} seed={seed}: trains up to {case['lr_trains']:.4g}, diverges in "
              f"[{case['lr_stable']:.4g}, {case['lr_divergent']:.4g}] "
              f"({case['wall_s']['total']:.0f} s)", flush=True)
  text = write_summary(args.out, summary_path, command)
  print(text)
  print(f"wrote {summary_path}")
  return text


if __name__ == "__main__":
  main()
