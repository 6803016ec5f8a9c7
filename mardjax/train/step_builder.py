"""The train step a plan asks for, ready for the loop: `build_step`.

One function turns the run's `mardjax.plan.Plan` into a callable
`step(state, items, step0) -> (state, metrics)` over the items of one
dispatch: the compiled program (`train_step.step_program`: one device, pmap
or shard_map; one step or several in a scan), where the batch is assembled
(on the host, `train_step.prepare_batch`, and copied; or on the device from
tables copied there once, with `index_batches.Planner` deciding on the host
what depends on each batch's indices), and how the state and tables are
placed on the devices. The training loop and the benchmarks use this and
nothing beneath it.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from mardjax import plan as plan_lib
from mardjax.data import input_pipeline
from mardjax.data import tables
from mardjax.train import index_batches
from mardjax.train import losses
from mardjax.train import sparse_embedding
from mardjax.train import train_step


class Step(NamedTuple):
  """A built step.

  Attributes:
    state: the state placed as the step takes it (replicated on a mesh).
    run: fn(state, items, step0) -> (state, metrics): `items` are the
      iterator's batches (host assembly: `input_pipeline.train_batches`'
      batches, one per dispatch) or indices (device assembly:
      `input_pipeline.train_indices`' through `planner.with_plans`) of
      steps step0, step0 + 1, ...; metrics as `train_step.per_device_step`
      gives them, 'finite' the least over the dispatch.
    planner: device assembly's host planner (its `with_plans` belongs in
      the iterator, off the step's path); None on the host path.
    saveable: fn(state) -> the state as checkpoints hold it (the sharded
      optimizer moments unpadded, `train_step.saveable_state`; the state
      itself when nothing is sharded).
  """
  state: Any
  run: Callable
  planner: index_batches.Planner | None
  saveable: Callable = lambda state: state


def process_sync() -> train_step.ProcessSync | None:
  """How the processes of this run agree on sizes (None: one process)."""
  return train_step.ProcessSync() if jax.process_count() > 1 else None


def positive_widths(config: ml_collections.ConfigDict, plan: plan_lib.Plan,
                    reviews: tables.ReviewTable, audio: tables.AudioTable
                    ) -> train_step.ProgramSizes:
  """The run's widths of the positive lists (`losses.positive_lists`),
  starting wider than the most rows one album holds in any batch of the
  first epoch (agreed between processes): one program for nearly every
  batch, where each batch's own width would compile the step once per
  width met. Wider by at least one row, so that a later epoch's slightly
  fuller album still fits; unused slots cost the step next to nothing."""
  widths = train_step.ProgramSizes()
  if plan.positives:
    t = config.train
    first_epoch = input_pipeline.epoch_order(
        reviews, audio, batch_size=t.batch_size // plan.processes,
        seed=config.seed, epoch=0, neighbourhood=t.neighbourhood_sampling,
        reviews_per_album=(t.reviews_per_album if t.neighbourhood_sampling
                           else 1), fill=t.fill_groups)
    most = input_pipeline.most_album_rows(reviews, first_epoch)
    widths({'positives': train_step.program_width(
        losses.positive_width(most + 1), process_sync())})
  return widths


def _replicated(mesh, tree):
  """`tree` copied to every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def placed_state(plan: plan_lib.Plan, config: ml_collections.ConfigDict,
                 state: train_step.TrainState, mesh
                 ) -> tuple[train_step.TrainState, Any]:
  """The state where the plan's step takes it (a restored or created state
  lives on one device): on shard_map's `mesh`, replicated but for the
  optimizer moments the plan shards (`train_step.optimizer_sharding`);
  elsewhere as it is. Returns (state, the step's sharding or None)."""
  if mesh is None:
    return state, None
  sharding = train_step.optimizer_sharding(
      state, plan, config.train.optimizer_shard_min_size)
  return train_step.place_state(state, mesh, sharding), sharding


def _device_assembled(plan, config, state, reviews, audio, base_key, widths,
                      mesh, sharding) -> Step:
  """The step fed indices: the tables copied to the devices once."""
  max_len = config.data.max_len
  device_tables = train_step.device_tables(reviews, audio, max_len)
  pmap = plan.parallelism == 'pmap'
  if pmap:  # Each process's devices hold its own albums.
    device_tables = train_step.replicate_tables(device_tables)
  elif mesh is not None:
    device_tables = _replicated(mesh, device_tables)
  lazy = train_step.lazy_embedding(plan, state.params)
  planner = index_batches.Planner(
      config, plan, reviews,
      sparse_embedding.split_table(state.params)[0].shape[0] if lazy else 0,
      process_sync(), widths)
  programs = {scan: train_step.step_program(
      plan.parallelism, config.loss, max_len=max_len, device_assembly=True,
      scan=scan, mesh=mesh, sharding=sharding) for scan in (False, True)}

  def run(s, items, step0):
    idx, layout = planner(items, pmap)
    return programs[len(items) > 1](s, device_tables, idx, base_key,
                                    np.int32(step0), layout)
  return Step(state, run, planner)


def _host_assembled(plan, config, state, base_key, widths, mesh,
                    sharding) -> Step:
  """The step fed batches the host prepares and copies, one a dispatch."""
  sync = process_sync()
  sizes = train_step.ProgramSizes(sync)
  program = train_step.step_program(plan.parallelism, config.loss, mesh=mesh,
                                    sharding=sharding)
  if plan.parallelism == 'pmap':
    def place(b):
      return b
  elif plan.parallelism == 'shard_map':
    def place(b):
      return train_step.shard_batch(b, mesh)
  else:
    def place(b):
      return {k: v[0] for k, v in b.items()}

  def run(s, items, step0):
    if len(items) != 1:
      raise ValueError('Host-assembled steps run one per dispatch.')
    batch = train_step.prepare_batch(s, items[0], plan,
                                     config.train.vocab_bucket, sync=sync,
                                     sizes=sizes, widths=widths)
    return program(s, None, place(batch), base_key, np.int32(step0),
                   train_step.Layout())
  return Step(state, run, None)


def build_step(plan: plan_lib.Plan, config: ml_collections.ConfigDict,
               state: train_step.TrainState, reviews: tables.ReviewTable,
               audio: tables.AudioTable, base_key: jax.Array,
               widths: train_step.ProgramSizes | None = None) -> Step:
  """The train step of `plan` for this run's data.

  Args:
    plan: the run's plan (parallelism, batch assembly, text layout, ...).
    config: the run's config (data.max_len, train.vocab_bucket, loss).
    state: the initial or restored train state.
    reviews, audio: this process's training tables (device assembly
      copies them to the devices).
    base_key: step i's PRNG key is fold_in(base_key, i).
    widths: the run's positive-list widths (`positive_widths`); None:
      each batch's own.
  """
  mesh = train_step.make_mesh() if plan.parallelism == 'shard_map' else None
  state, sharding = placed_state(plan, config, state, mesh)
  if plan.batch_assembly == 'device':
    step = _device_assembled(plan, config, state, reviews, audio, base_key,
                             widths, mesh, sharding)
  else:
    step = _host_assembled(plan, config, state, base_key, widths, mesh,
                           sharding)
  return step._replace(saveable=functools.partial(
      train_step.saveable_state, sharding=sharding))
