"""Global against per-shard Hutchinson probes on a sharded batch: bias, spread, communication.

``kstep.gauss_newton_trace(..., axis_name=..., probe_scope=...)`` inside ``shard_map``:
``"global"`` gives the single-device estimate (one all-reduce of P floats per probe);
``"per_shard"`` sums per-device squared norms (one scalar per probe). Both are unbiased; this
measures, on the MNIST-sized MLP of ``examples/data_parallel.py`` (784-256-256-10, ReLU, at
init and after 200 SGD steps, generated data, global batch 128), the per-probe standard deviation
of each against the exact trace (per-example Jacobians). Needs several devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.probe_scope

Writes ``benchmarks/results/data_parallel/probe_scope_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kstep
from benchmarks.models import MLP


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--probes", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "data_parallel"))
  args = parser.parse_args(argv)
  n_dev = jax.device_count()
  if n_dev < 2 or args.batch_size % n_dev:
    parser.error(f"needs >= 2 devices dividing the batch size; have {n_dev}")
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2048, 784)).astype(np.float32)
  y = rng.integers(0, 10, size=2048)
  batch = {"x": x[: args.batch_size], "y": jax.nn.one_hot(y[: args.batch_size], 10)}
  model = MLP(width=256, depth=2, activation="relu")
  apply_fn = lambda p, b: model.apply(p, b["x"])
  params0 = model.init(jax.random.PRNGKey(0), x[:1])

  def trained(params, steps=200):
    loss = lambda p, b: jnp.mean(0.5 * jnp.sum(jnp.square(apply_fn(p, b) - b["y"]), -1))
    opt = optax.sgd(0.01, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    def step(p, s, b):
      updates, s = opt.update(jax.grad(loss)(p, b), s, p)
      return optax.apply_updates(p, updates), s

    for t in range(steps):
      idx = np.random.default_rng(t).choice(2048, args.batch_size, replace=False)
      params, state = step(params, state, {"x": x[idx], "y": jax.nn.one_hot(y[idx], 10)})
    return params

  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  rows = []
  for when, params in (("init", params0), ("after 200 SGD steps", trained(params0))):
    num_params = ravel_pytree(params)[0].size
    for loss in ("mse", "softmax_cross_entropy"):
      exact = float(jax.jit(lambda p, b: kstep.gauss_newton_trace(
          apply_fn, p, b, loss=loss, method="exact"
      ).value)(params, batch))
      row = {"params": when, "loss": loss, "exact": exact, "num_params": num_params}
      for scope in ("global", "per_shard"):
        fn = jax.jit(jax.shard_map(
            lambda p, b: kstep.gauss_newton_trace(
                apply_fn, p, b, loss=loss, key=jax.random.PRNGKey(1), num_probes=args.probes,
                chunk_size=100, axis_name="data", probe_scope=scope,
            ), mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
        ))
        est = fn(jax.device_put(params, NamedSharding(mesh, P())), sharded)
        mean, se = float(est.value), float(est.stderr)
        row[scope] = {
            "mean": mean, "stderr": se, "per_probe_std": se * np.sqrt(args.probes),
            "z_vs_exact": (mean - exact) / se,
            "floats_all_reduced_per_probe": num_params if scope == "global" else 1,
        }
      row["variance_ratio_per_shard_over_global"] = (
          row["per_shard"]["per_probe_std"] / row["global"]["per_probe_std"]
      ) ** 2
      rows.append(row)
      print(f"{when:>20s} {loss:22s} exact {exact:10.4g}  global {row['global']['mean']:10.4g} "
            f"± {row['global']['stderr']:.2g} (std/probe {row['global']['per_probe_std']:.3g})  "
            f"per_shard {row['per_shard']['mean']:10.4g} ± {row['per_shard']['stderr']:.2g} "
            f"(std/probe {row['per_shard']['per_probe_std']:.3g})  variance ratio "
            f"{row['variance_ratio_per_shard_over_global']:.3f}")
  dev = jax.devices()[0]
  result = {
      "device": f"{n_dev} x {dev.device_kind} ({dev.platform})", "batch_size": args.batch_size,
      "num_probes": args.probes, "model": "MLP 784-256-256-10 ReLU (benchmarks.models.MLP)",
      "data": "generated: x ~ N(0, I) 784-dim, random labels", "rows": rows,
      "command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                 "python -m benchmarks.probe_scope",
  }
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"probe_scope_{dev.platform}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", path)
  return result


if __name__ == "__main__":
  main()
