"""The LSTM recurrence with a hand-written backward pass.

`recurrence(proj, keep, wh, reverse)` runs the LSTM over time given every
position's input projection `proj` = x @ W_i + b, computed before the loop
as one matrix product. Autodiff of a `lax.scan` would accumulate the
recurrent kernel's gradient step by step (a small (H, R) x (R, 4H) product
per position, on the critical path); here the backward scan only carries
the state gradients and emits each position's gate gradient, and the kernel
gradient is one large product afterwards, sum_t h_{t-1}^T dz_t, off the
sequential path (the train benchmark's LSTM rows; see docs/performance.md).
`reference` is the plain scan, differentiated by JAX, for tests.

`bidirectional` runs a forward and a backward LSTM in one loop (P
sequential positions instead of 2P, a batched product per position), for
devices where a loop's positions cost more in latency than in arithmetic.

Shapes: proj (P, R, 4H) time-major, keep (P, R, 1) (0 resets the state
before that position: a review starts there in the direction of travel),
wh (H, 4H); gates in the order i, f, g, o. Returns hidden states (P, R, H).
"""

import functools

import jax
import jax.numpy as jnp


def _cell(c, h, xp, keep, wh):
  """One step; returns the new (c, h) and what the backward pass needs."""
  c, h = c * keep, h * keep
  z = xp + jnp.matmul(h, wh)  # (R, H) x (H, 4H), or batched over (D, ...).
  i, f, g, o = jnp.split(z, 4, axis=-1)
  i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
  g = jnp.tanh(g)
  c_new = f * c + i * g
  tc = jnp.tanh(c_new)
  return c_new, o * tc, (c, h, i, f, g, o, tc)


def _cell_backward(dh, dc_next, keep, wh, c0, i, f, g, o, tc):
  """The gradient through `_cell`: dh, dc_next of its outputs (h, c) ->
  those of its state inputs (before the reset) and of its gates' input z."""
  do = dh * tc
  dc = dc_next + dh * o * (1 - tc * tc)
  dz = jnp.concatenate([dc * g * i * (1 - i), dc * c0 * f * (1 - f),
                        dc * i * (1 - g * g), do * o * (1 - o)], -1)
  # Through the reset: the kept state is state * keep.
  return (jnp.matmul(dz, jnp.swapaxes(wh, -1, -2)) * keep, dc * f * keep,
          dz)


def _zeros(proj, wh):
  return jnp.zeros((proj.shape[1], wh.shape[0]), proj.dtype)


def reference(proj, keep, wh, reverse: bool):
  """The recurrence as a plain scan (autodiff backward)."""
  def step(carry, inputs):
    c, h, _ = _cell(*carry, *inputs, wh)
    return (c, h), h
  z = _zeros(proj, wh)
  return jax.lax.scan(step, (z, z), (proj, keep), reverse=reverse)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recurrence(proj, keep, wh, reverse: bool):
  return reference(proj, keep, wh, reverse)


def _forward(proj, keep, wh, reverse):
  def step(carry, inputs):
    c, h, saved = _cell(*carry, *inputs, wh)
    return (c, h), (h, saved)
  z = _zeros(proj, wh)
  _, (hs, saved) = jax.lax.scan(step, (z, z), (proj, keep), reverse=reverse)
  return hs, (keep, wh, saved)


def _backward(reverse, residuals, d_hs):
  keep, wh, (c_prev, h_prev, i, f, g, o, tc) = residuals

  def step(carry, inputs):
    dh_next, dc_next = carry
    dh_out, k, *cell = inputs
    dh_prev, dc_prev, dz = _cell_backward(dh_out + dh_next, dc_next, k, wh,
                                          *cell)
    return (dh_prev, dc_prev), dz

  z = jnp.zeros_like(d_hs[0])
  _, dz = jax.lax.scan(step, (z, z),
                       (d_hs, keep, c_prev, i, f, g, o, tc),
                       reverse=not reverse)
  d_wh = jnp.einsum('prh,prg->hg', h_prev, dz)
  return dz, jnp.zeros_like(keep), d_wh


recurrence.defvjp(_forward, _backward)


def _both_at(proj, keep_f, keep_b, t):
  """Loop position t's inputs: the forward direction's time t and the
  backward direction's time P - 1 - t -> (2, R, 4H), (2, R, 1)."""
  back = proj.shape[0] - 1 - t
  at = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)
  return (jnp.stack([at(proj, t)[:, 0], at(proj, back)[:, 1]]),
          jnp.stack([at(keep_f, t), at(keep_b, back)]))


def _bidirectional_scan(proj, keep_f, keep_b, wh, save: bool):
  def step(carry, t):
    x, k = _both_at(proj, keep_f, keep_b, t)
    c, h, saved = _cell(*carry, x, k, wh)
    return (c, h), ((h, k, saved) if save else h)
  z = jnp.zeros((2, proj.shape[1], wh.shape[-2]), proj.dtype)
  return jax.lax.scan(step, (z, z), jnp.arange(proj.shape[0]))[1]


@jax.custom_vjp
def bidirectional(proj, keep_f, keep_b, wh):
  """A forward and a backward LSTM over the same rows in one loop.

  Args:
    proj: (P, R, 2, 4H) input projections in time order, [:, :, 0] the
      forward direction's and [:, :, 1] the backward's (one product with
      both input kernels side by side: no copy reorders them).
    keep_f: (P, R, 1), 0 where a review starts reading forward.
    keep_b: (P, R, 1), 0 where a review starts reading backward (its end).
    wh: (2, H, 4H) the recurrent kernels, forward then backward.

  Returns:
    (P, 2, R, H) in loop order: [t, 0] the forward direction's hidden
    states at time t, [t, 1] the backward direction's at time P - 1 - t.
  """
  return _bidirectional_scan(proj, keep_f, keep_b, wh, save=False)


def _bidirectional_forward(proj, keep_f, keep_b, wh):
  hs, keeps, saved = _bidirectional_scan(proj, keep_f, keep_b, wh, save=True)
  return hs, (keep_f, keep_b, wh, keeps, saved)


def _bidirectional_backward(residuals, d_hs):
  keep_f, keep_b, wh, keeps, saved = residuals
  c_prev, h_prev = saved[:2]
  p, _, r, _ = d_hs.shape

  def step(carry, inputs):
    dh_next, dc_next, d_proj = carry
    t, dh_out, k, *cell = inputs
    dh_prev, dc_prev, dz = _cell_backward(dh_out + dh_next, dc_next, k, wh,
                                          *cell)
    # Each direction's gate gradient into its own time's slot of the
    # (P, R, 2, 4H) result, updated in place by the loop.
    zero = jnp.zeros((), t.dtype)
    d_proj = jax.lax.dynamic_update_slice(
        d_proj, dz[0][None, :, None], (t, zero, zero, zero))
    d_proj = jax.lax.dynamic_update_slice(
        d_proj, dz[1][None, :, None], (p - 1 - t, zero, zero + 1, zero))
    return (dh_prev, dc_prev, d_proj), None

  z = jnp.zeros_like(d_hs[0])
  d_proj = jnp.zeros((p, r, 2, wh.shape[-1]), wh.dtype)
  (_, _, d_proj), _ = jax.lax.scan(
      step, (z, z, d_proj),
      (jnp.arange(p), d_hs, keeps, c_prev, *saved[2:]), reverse=True)
  # sum_t h_{t-1}^T dz_t per direction; the backward direction's states are
  # in loop order, its gradients in time order.
  d_wh = jnp.stack([
      jnp.einsum('prh,prg->hg', h_prev[:, 0], d_proj[:, :, 0]),
      jnp.einsum('prh,prg->hg', h_prev[::-1, 1], d_proj[:, :, 1])])
  return d_proj, jnp.zeros_like(keep_f), jnp.zeros_like(keep_b), d_wh


bidirectional.defvjp(_bidirectional_forward, _bidirectional_backward)
