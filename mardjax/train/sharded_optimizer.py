"""Optimizer state sharded over the data axis (the shard_map step's).

With the state replicated, every device of a data-parallel step holds the
whole optimizer state, receives the whole averaged gradient (an
all-reduce) and runs Adam over every parameter: at MARD's sizes the word
table's two moments are two thirds of the state, and its update the
largest pass of the step. Sharded, each large optimizer leaf (`Sharding`)
is split by rows over the devices: a device holds 1/N of the moments,
receives only its rows of the averaged gradient (a reduce-scatter), updates
only its rows, and the updated parameters are gathered back (an
all-gather) so that the next forward pass reads them whole. A reduce-scatter
plus an all-gather is the arithmetic of the all-reduce it replaces.

Rows are padded to a multiple of the device count inside the optimizer
state only (the parameters keep their shapes; padded rows get a zero
gradient and so a zero update). Checkpoints hold the moments unpadded, in
the parameters' shapes (`unpadded`), so a run resumes on any number of
devices, and a one-device run reads them as they are.

Used by `train_step` (`reduce_gradients`, `apply_updates` in the step's
body) and `step_builder` (`place`, `unpadded`, `state_specs`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax


class Sharding(NamedTuple):
  """Which optimizer leaves are split by rows over the data axis (static).

  Attributes:
    flags: one per leaf of the optimizer's parameter tree (the tree
      `tx.init` was given; `jax.tree_util.tree_leaves` order): True for a
      leaf whose moments are sharded.
    devices: the data axis' size.
  """
  flags: tuple[bool, ...]
  devices: int

  def tree(self, params) -> Any:
    """The flags as a tree shaped like `params`."""
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), self.flags)

  def rows(self, n: int) -> int:
    """Rows of a sharded leaf of n rows on one device (n padded to a
    multiple of the devices, divided among them)."""
    return -(-n // self.devices)


def plan(params, devices: int, min_size: int) -> Sharding | None:
  """The leaves of `params` (the optimizer's parameter tree) worth sharding
  over `devices`: those of at least `min_size` elements (the small ones
  cost a collective each and save next to nothing). None when nothing is
  sharded."""
  flags = tuple(bool(devices > 1 and np.ndim(x) >= 1 and
                     np.size(x) >= min_size)
                for x in jax.tree_util.tree_leaves(params))
  return Sharding(flags, devices) if any(flags) else None


def _map_moments(tx, fn, opt_state, sharding: Sharding, params, other=None):
  """fn(moment, sharded, param) over the parameter-shaped leaves of
  `opt_state` (Adam's moments); `other(x)` over the rest (its step
  count), unchanged when None."""
  return optax.tree_map_params(tx, fn, opt_state, sharding.tree(params),
                               params, transform_non_params=other)


def _pad_rows(x, rows: int):
  pad = rows - x.shape[0]
  if not pad:
    return x
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def place(tx, opt_state, params, sharding: Sharding, mesh: Mesh):
  """The optimizer state as the sharded step takes it: each sharded moment
  padded by rows and split over `mesh`'s data axis, the rest replicated.

  Args:
    tx: the optax transformation that made `opt_state`.
    opt_state: its state, moments in the parameters' shapes (as created or
      restored).
    params: the optimizer's parameter tree.
    sharding: `plan`'s answer for these parameters.
    mesh: the 1-D mesh of the step.
  """
  axis = mesh.axis_names[0]
  split = NamedSharding(mesh, P(axis))
  whole = NamedSharding(mesh, P())

  def one(x, sharded, p):
    if not sharded:
      return jax.device_put(x, whole)
    rows = sharding.rows(p.shape[0]) * sharding.devices
    padded = np.zeros((rows, *x.shape[1:]), x.dtype)
    padded[:x.shape[0]] = np.asarray(x)
    return jax.device_put(padded, split)
  return _map_moments(tx, one, opt_state, sharding, params,
                      other=lambda x: jax.device_put(x, whole))


def unpadded(tx, opt_state, params, sharding: Sharding):
  """The sharded optimizer state back in the parameters' shapes (host
  arrays for the sharded moments): what a checkpoint holds."""
  def one(x, sharded, p):
    return np.asarray(x)[:p.shape[0]] if sharded else x
  return _map_moments(tx, one, opt_state, sharding, params)


def state_specs(tx, opt_state, params, sharding: Sharding, axis: str):
  """shard_map's partition specs of `opt_state`: P(axis) for the sharded
  moments, P() for the rest."""
  return _map_moments(tx, lambda _, sharded, __: P(axis) if sharded else P(),
                      opt_state, sharding, params, other=lambda _: P())


def reduce_gradients(grads, sharding: Sharding, axis_name: str):
  """This device's share of the gradients averaged over the devices: the
  rows it updates of each sharded leaf (padded rows / devices, ...), a
  reduce-scatter; the others whole, an all-reduce (pmean)."""
  def one(g, sharded):
    if not sharded:
      return jax.lax.pmean(g, axis_name)
    rows = sharding.rows(g.shape[0]) * sharding.devices
    return jax.lax.psum_scatter(_pad_rows(g, rows), axis_name,
                                scatter_dimension=0,
                                tiled=True) / sharding.devices
  return jax.tree_util.tree_map(one, grads, sharding.tree(grads))


def _local_rows(x, sharding: Sharding, axis_name: str):
  """This device's rows of `x` (zeros past its last row), without copying
  the padded whole."""
  rows = sharding.rows(x.shape[0])
  index = jax.lax.axis_index(axis_name) * rows + jnp.arange(rows)
  return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


def apply_updates(tx, opt_state, params, local_grads, sharding: Sharding,
                  axis_name: str) -> tuple[Any, Any, jax.Array]:
  """One optimizer update from `reduce_gradients`' shares.

  Args:
    tx: the optax transformation (element-wise, such as Adam: each device
      updates its rows alone).
    opt_state: this device's optimizer state (its rows of the sharded
      moments).
    params: the optimizer's parameter tree, whole.
    local_grads: `reduce_gradients(grads, ...)`.
    sharding: the step's `Sharding`.
    axis_name: the data axis.

  Returns:
    (new parameters, whole on every device; new optimizer state, this
    device's rows; the global norm of the averaged gradient).
  """
  flags = sharding.tree(params)
  view = jax.tree_util.tree_map(
      lambda p, s: _local_rows(p, sharding, axis_name) if s else p,
      params, flags)
  updates, opt_state = tx.update(local_grads, opt_state, view)
  view = optax.apply_updates(view, updates)

  def gathered(v, p, s):
    if not s:
      return v
    return jax.lax.all_gather(v, axis_name, axis=0, tiled=True)[:p.shape[0]]
  new_params = jax.tree_util.tree_map(gathered, view, params, flags)
  whole, split = [], []
  for g, s in zip(jax.tree_util.tree_leaves(local_grads), sharding.flags):
    (split if s else whole).append(jnp.sum(jnp.square(g)))
  squares = sum(whole, jnp.zeros((), jnp.float32))
  squares += jax.lax.psum(sum(split, jnp.zeros((), jnp.float32)), axis_name)
  return new_params, opt_state, jnp.sqrt(squares)
