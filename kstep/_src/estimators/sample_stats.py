"""Sample means of i.i.d. probes or batches and their standard errors."""

import jax
import jax.numpy as jnp

Array = jax.Array


def mean_and_stderr(samples: Array) -> tuple[Array, Array]:
  """Mean of i.i.d. samples along axis 0 and its standard error (NaN for a single sample)."""
  n = samples.shape[0]
  mean = jnp.mean(samples)
  if n == 1:
    return mean, jnp.full((), jnp.nan, jnp.float32)
  return mean, jnp.std(samples, ddof=1) / jnp.sqrt(jnp.float32(n))


def ratio_of_means(num: Array, den: Array) -> tuple[Array, Array]:
  """``mean(num)/mean(den)`` and its delta-method standard error (0/0 gives 0)."""
  m = num.shape[0]
  mn, md = jnp.mean(num), jnp.mean(den)
  safe = jnp.where(md > 0, md, 1.0)
  r = jnp.where(md > 0, mn / safe, 0.0)
  if m == 1:
    return r, jnp.full((), jnp.nan, jnp.float32)
  resid = num - r * den
  return r, jnp.where(md > 0, jnp.std(resid, ddof=1) / jnp.sqrt(jnp.float32(m)) / safe, 0.0)
