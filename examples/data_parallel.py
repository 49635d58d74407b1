"""Data-parallel training with kstep on JAX's own sharding: an MNIST MLP over all local devices.

The batch is split over a one-axis device mesh (``NamedSharding``, axis ``"data"``), params are
replicated, and one ``jax.jit``-ed step computes the gradient and runs ``k_controlled_sgd``: the
compiler inserts the all-reduces, kstep needs no option for it (``batch_size`` is the global batch
size). The K estimate on the sharded batch is the single-device estimate on the same batch: the
script trains the same model from the same init on the same batches on one device as well, and
prints the largest relative difference of the final params and both steps/s (timed after a
warm-up, one run each). The steps/s comparison means something only with several devices: on one
device both runs are the same computation and any difference is noise (compilation, caches,
other load), so the script then prints one rate and says so. Simulated CPU devices share the same
cores, so their steps/s say nothing about real accelerators either.

MNIST from ``--data-dir`` (a folder with ``mnist.npz``), else generated data of the same shape
(784 Gaussian inputs, labels from a random two-layer teacher). MLP 784-256-256-10 (ReLU), MSE
loss ℓ = ½‖f − onehot‖², momentum 0.9, band K ∈ [0.4, 0.8], base LR 1 (too large for plain SGD).

On a CPU, simulate devices (the flag must be set before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

Multi-host: start the same script on every host with ``--coordinator-address host:port
--num-processes N --process-id i`` (it calls ``jax.distributed.initialize``); ``jax.devices()``
then spans all hosts and each process hands only its own rows of every batch to
``jax.make_array_from_process_local_data``. Two processes on one CPU machine, 4 devices each::

    for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 python \
      examples/data_parallel.py --coordinator-address localhost:12355 --num-processes 2 \
      --process-id $i & done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kstep

WARMUP_STEPS = 20  # steps run before the steps/s clock starts


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


def load_data(data_dir: str | None, n: int) -> tuple[np.ndarray, np.ndarray]:
  """``(x (n, 784) float32 standardised, y (n,) int32)``."""
  if data_dir is not None:
    with np.load(os.path.join(data_dir, "mnist.npz")) as d:
      x, y = d["x_train"][:n].reshape(-1, 784) / 255.0, d["y_train"][:n]
  else:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 784))
    w1, w2 = rng.normal(size=(784, 64)) / 28.0, rng.normal(size=(64, 10))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=-1)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  return x.astype(np.float32), y.astype(np.int32)


def train(args, x, y, data: jax.sharding.Sharding, replicated: jax.sharding.Sharding,
          rows: slice = slice(None)):
  """Trains with batches placed by ``data`` and params by ``replicated``; this process holds
  ``rows`` of every batch. Returns (params, losses, steps per second after the warm-up, kstep
  stats, number of compilations)."""
  model = MLP()
  apply_fn = lambda p, batch: model.apply(p, batch["x"])

  def loss_fn(p, batch):
    err = apply_fn(p, batch) - jax.nn.one_hot(batch["y"], 10)
    return jnp.mean(0.5 * jnp.sum(jnp.square(err), axis=-1))

  opt = kstep.k_controlled_sgd(
      args.learning_rate, batch_size=args.batch_size, apply_fn=apply_fn, loss="mse",
      target=(0.4, 0.8), momentum=0.9,
  )

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  def put(batch):
    # Each process hands over its own rows; with one process these are all rows.
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(data, a[rows]), batch)

  params = jax.device_put(model.init(jax.random.PRNGKey(0), x[:1]), replicated)
  rng = np.random.default_rng(1)
  order = [rng.choice(len(x), args.batch_size, replace=False) for _ in range(args.steps)]
  first = put({"x": x[order[0]], "y": y[order[0]]})
  # Make the state where the step leaves it (momentum like params, scalars replicated), so every
  # step takes and returns the same shardings and compiles once. Initialising under jit with those
  # out_shardings (rather than device_put of a host state) also works across processes, where
  # device_put checks that every process passes equal values, which NaN stats never are.
  shardings = step.lower(params, jax.eval_shape(opt.init, params), first).compile()
  state = jax.jit(opt.init, out_shardings=shardings.output_shardings[1])(params)

  # The clock starts after a warm-up of WARMUP_STEPS steps (the first compiles, and the first
  # estimate steps and caches are slower than the rest).
  warmup = min(WARMUP_STEPS, args.steps - 1)
  losses, start = [], None
  for t, idx in enumerate(order):
    params, state, loss = step(params, state, put({"x": x[idx], "y": y[idx]}))
    losses.append(loss)
    if t % 10 == 0:
      # Wait for the device now and then, as logging would: XLA's CPU backend can deadlock in its
      # all-reduce rendezvous when hundreds of multi-device steps are queued at once.
      jax.block_until_ready(loss)
    if t == warmup:
      jax.block_until_ready(loss)
      start = time.perf_counter()
  jax.block_until_ready(params)
  timed = args.steps - 1 - warmup
  rate = timed / (time.perf_counter() - start) if timed > 0 else float("nan")
  losses = [float(v) for v in jax.device_get(losses)]
  return params, losses, rate, jax.device_get(kstep.stats(state)), step._cache_size()


def speed_report(num_devices: int, platform: str, rate_dp: float, rate_one: float,
                 warmup: int) -> tuple[dict, list[str]]:
  """The steps/s to record and the lines to print. With one device the two runs are the same
  computation, so there is no ratio, only one rate and the reason."""
  if num_devices == 1:
    return {"steps_per_s": rate_dp}, [
        f"steps/s: {rate_dp:.1f} (timed after {warmup} warm-up steps)",
        "only one device: the data-parallel and one-device runs are the same computation, so "
        "there is no speed-up to measure (their rates would differ only by compilation, warm-up "
        "and noise). Compare on several devices; on CPU "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8, which share the same "
        "cores, so their rates say nothing about real accelerators.",
    ]
  lines = [f"steps/s after {warmup} warm-up steps: data parallel {rate_dp:.1f} on {num_devices} "
           f"devices, one device {rate_one:.1f} (ratio {rate_dp / rate_one:.2f})"]
  if platform == "cpu":
    lines.append("(simulated CPU devices share the same cores: these rates say nothing about "
                 "real accelerators)")
  return {"steps_per_s": rate_dp, "steps_per_s_one_device": rate_one}, lines


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None, help="folder with mnist.npz (else generated)")
  parser.add_argument("--n-train", type=int, default=10_000)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
  parser.add_argument("--learning-rate", type=float, default=1.0, help="base learning rate")
  parser.add_argument("--no-timing", action="store_true", help="skip the steps/s report")
  parser.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--result-json", default=None, help="also write the result here")
  args = parser.parse_args(argv)

  if args.coordinator_address is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  devices = jax.devices()
  if args.batch_size % len(devices):
    parser.error(f"--batch-size {args.batch_size} must be a multiple of {len(devices)} devices")
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x, y = load_data(args.data_dir, args.n_train)

  per_process = args.batch_size // jax.process_count()
  mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  p_dp, loss_dp, rate_dp, stats_dp, comp_dp = train(
      args, x, y, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()), mine
  )
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  p_one, loss_one, rate_one, _, comp_one = train(args, x, y, one, one)
  diff = max(
      float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
      for a, b in zip(jax.tree.leaves(jax.device_get(p_dp)), jax.tree.leaves(p_one))
  )
  result = {
      "device": devices[0].device_kind, "platform": devices[0].platform,
      "num_devices": len(devices), "num_processes": jax.process_count(),
      "global_batch_size": args.batch_size,
      "final_loss": loss_dp[-1], "final_loss_one_device": loss_one[-1],
      "final_k": float(stats_dp["k"]), "final_learning_rate": float(stats_dp["k_learning_rate"]),
      "max_param_rel_diff": diff,
      "compilations": (comp_dp, comp_one),
  }
  print(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}) in "
        f"{jax.process_count()} process(es), global batch {args.batch_size}, {args.steps} steps")
  print(f"final loss: data parallel {loss_dp[-1]:.4f}, one device {loss_one[-1]:.4f}; "
        f"K {result['final_k']:.3f}, lr {result['final_learning_rate']:.4g}")
  print(f"largest relative difference of the final params: {diff:.2e}")
  if not args.no_timing:
    warmup = min(WARMUP_STEPS, args.steps - 1)
    rates, lines = speed_report(len(devices), devices[0].platform, rate_dp, rate_one, warmup)
    result.update(rates)
    print("\n".join(lines))
  if args.result_json is not None:
    with open(args.result_json, "w") as f:
      json.dump(result, f)
  return result


if __name__ == "__main__":
  main()
