"""Checkpoints: orbax saves of the train state, and restores for inference.

The one module of the training layer that evaluation and serving import.
It needs neither the optimizer nor the data: `load_for_inference` builds the
restore target with `jax.eval_shape` from sizes in the data manifest and
reads only the model's variables (parameters and BatchNorm statistics) out
of the saved train state, as big_vision's `tools/eval_only.py` restores
parameters without a trainer.

Layout of a checkpoint step (orbax `Composite`):

  state   the whole train state (`train_step.TrainState`: step, params,
          opt_state, batch_stats, embed_opt), one replicated copy; in the
          best-by-recall directory (`BEST_DIR`) the model's variables only
          (`inference_variables`: params, batch_stats), which is all that
          `load_for_inference` reads of either
  meta    JSON: format_version, step, input position, data manifest hash,
          the config, best dev recall so far

`FORMAT_VERSION` 1 checkpoints (before the field existed) hold the same two
items and are read the same way.
"""

import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.models import two_branch

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'
FORMAT_VERSION = 2
# Parts of the train state the model's `apply` reads.
VARIABLE_FIELDS = ('params', 'batch_stats')


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's tree handler, told not to copy host arrays before a save.

  Its default `NumpyHandler` deep-copies every host array into fresh memory
  before `save` returns, so that an async write never sees them change: at
  paper sizes 187 MB of page faults while the loop waits. `Checkpoints`
  keeps that guarantee itself, with buffers it reuses (`_HostCopy`).
  Compression is off: zstd saves about 8% of a float table's bytes (float
  bits compress poorly) for CPU time taken from the training step running beside
  the write (the train_loop benchmark's checkpoints; see
  docs/performance.md). Everything else (scalars,
  the global arrays of several processes) keeps orbax's own handlers.
  """
  numpy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  others = [(ty, ocp.type_handlers.get_type_handler(ty))
            for ty in (int, float, bytes, np.number, jax.Array, str)]
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, numpy), *others)
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                     use_compression=False)


class _HostCopy:
  """The state's arrays copied into host buffers kept from save to save.

  A save hands orbax these buffers and nothing else; the next save first
  waits for the previous write to finish (`wait`), then overwrites them.
  Warm memory copies the 187 MB state without the page faults of fresh
  memory. On a CPU `jax.device_get` returns views of the device
  buffers (the copy here is the only one); a step can donate them again as
  soon as the copy is made.
  """

  def __init__(self):
    self._buffers = {}

  def __call__(self, tree, wait: Callable[[], None]):
    host = jax.device_get(tree)
    wait()
    leaves, treedef = jax.tree_util.tree_flatten(host)
    out = []
    for i, leaf in enumerate(leaves):
      leaf = np.asarray(leaf)
      buf = self._buffers.get(i)
      if buf is None or buf.shape != leaf.shape or buf.dtype != leaf.dtype:
        buf = self._buffers[i] = np.empty_like(leaf)
      np.copyto(buf, leaf)
      out.append(buf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _all_devices_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.devices()), ('all',))


def _replicated_global(tree):
  """Multi-process: host-local replicated arrays -> global replicated arrays.

  orbax writes only global arrays when several processes take part; each
  process's copy of the (identical) state becomes one replicated array over
  every device.
  """
  return multihost_utils.host_local_array_to_global_array(
      jax.device_get(tree), _all_devices_mesh(), P())


def _replicated_local(tree):
  """The inverse of `_replicated_global`: this process's copy of each array."""
  if jax.process_count() == 1:
    return tree
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data), tree)


def _abstract(tree):
  """Restore targets: shapes, dtypes and, on several processes, shardings."""
  if jax.process_count() == 1:
    return tree
  sharding = NamedSharding(_all_devices_mesh(), P())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          np.shape(x), x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype,
          sharding=sharding), tree)


class NonFiniteCheckpoint(ValueError):
  """A checkpoint that reads back, but holds NaN or infinite values."""


def _require_finite(tree) -> None:
  """Raises NonFiniteCheckpoint when a floating array of `tree` holds a
  non-finite value (a damaged file can restore without an error)."""
  bad = total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.floating):
      bad += int(x.size - np.count_nonzero(np.isfinite(x)))
      total += x.size
  if bad:
    raise NonFiniteCheckpoint(f'{bad} of {total} values are not finite')


class Checkpoints:
  """orbax CheckpointManager for the state plus a JSON record of the run."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = directory
    # The files are StandardSave's (which wraps the same tree handler):
    # checkpoints written by StandardSave read back unchanged.
    self.manager = ocp.CheckpointManager(
        directory, options=options, item_handlers={
            'state': _state_handler(), 'meta': ocp.JsonCheckpointHandler()})
    self._host_copy = _HostCopy()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    if step in self.manager.all_steps():
      # A resumed run reaching a step an earlier run also saved (e.g. the
      # best-by-recall copy written just before a crash): the new one wins.
      self.manager.wait_until_finished()
      self.manager.delete(step)
    meta = dict(meta, format_version=FORMAT_VERSION)
    if jax.process_count() == 1:
      # The previous save must be written before its buffers are reused.
      state = self._host_copy(state, self.manager.wait_until_finished)
    else:  # orbax's ArrayHandler copies global arrays itself.
      state = _replicated_global(state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, abstract_state,
                     check_meta: Callable[[dict[str, Any]], None] | None = None,
                     partial: bool = False):
    """(step, state, meta) of the newest readable checkpoint, or None.

    Args:
      abstract_state: the structure to read (values unused): the whole train
        state, or with `partial` a subset of its fields as a dict.
      check_meta: called with the run record before the state is read; may
        raise (e.g. for another data manifest), which stops the restore.
      partial: read only the fields of `abstract_state` (inference).

    An unreadable newest checkpoint (a crash mid-write, a damaged disk), or
    one that reads back with NaN or infinite values, gets a warning, is
    moved aside, and the previous one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      if meta.get('format_version', 1) > FORMAT_VERSION:
        raise UserError(
            f'{self.directory}/{step} was written by a newer mardjax '
            f'(checkpoint format {meta["format_version"]}, this code reads '
            f'up to {FORMAT_VERSION}): update mardjax.')
      if check_meta is not None:
        check_meta(meta)
      target = _abstract(abstract_state)
      args = ocp.args.PyTreeRestore(
          item=target, partial_restore=partial,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target))
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=args))
        state = _replicated_local(restored['state'])
        _require_finite(state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    # Moved, not deleted (someone may want to look at it), so that the
    # resumed run can write this step again.
    aside = os.path.join(os.path.dirname(self.directory),
                         f'unreadable_checkpoints/{step}-{int(time.time())}')
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), aside)
    self.manager.reload()
    logging.warning('Checkpoint at step %d is unreadable (%s: %s); moved it '
                    'to %s and falling back to the previous one.', step,
                    type(error).__name__, error, aside)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_same_data(meta: dict[str, Any], manifest_hash: str,
                    workdir: str) -> None:
  """Refuses checkpoints trained on other data (before reading the state)."""
  if meta['manifest_hash'] != manifest_hash:
    raise UserError(
        f'The checkpoints in {workdir} were trained on different data '
        f'(manifest {meta["manifest_hash"][:12]}, now {manifest_hash[:12]}): '
        'use a new --workdir, or the data they were trained on.')


def inference_variables(state) -> dict[str, Any]:
  """The variables model.apply needs: params and BatchNorm statistics."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def params_fingerprint(params) -> str:
  """sha256 of every parameter's bytes, in tree order: equal iff identical."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params)):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def require_checkpoints(workdir: str, directory: str = CHECKPOINT_DIR
                        ) -> str:
  """workdir/directory, or a UserError when it holds no checkpoint."""
  ckpt_dir = os.path.join(workdir, directory)
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    raise UserError(f'No checkpoint in {ckpt_dir!r}: train first '
                    '(--mode=train).')
  return ckpt_dir


def inference_source(workdir: str) -> str:
  """The checkpoint directory serving uses: the best-by-recall one when a
  run kept it, else the rolling checkpoints."""
  return BEST_DIR if os.path.isdir(os.path.join(workdir, BEST_DIR)) else (
      CHECKPOINT_DIR)


def run_config(workdir: str) -> dict[str, Any] | None:
  """The config a run was trained with (as JSON), from the newest readable
  record of its serving checkpoints; None when there is none."""
  source = os.path.join(workdir, inference_source(workdir))
  if not os.path.isdir(source):
    return None
  manager = ocp.CheckpointManager(
      source, options=ocp.CheckpointManagerOptions(create=False))
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        meta = manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
        return json.loads(meta['config'])
      except Exception:  # pylint: disable=broad-except
        continue  # restore_latest sets unreadable ones aside, not this.
  finally:
    manager.close()
  return None


class Inference(NamedTuple):
  """A trained model ready to `apply`: what `load_for_inference` returns."""
  model: two_branch.TwoBranch
  variables: dict[str, Any]
  step: int
  source: str
  manifest: manifest_lib.Manifest


def load_for_inference(config: ml_collections.ConfigDict, workdir: str,
                       manifest: manifest_lib.Manifest | None = None,
                       directory: str | None = None) -> Inference:
  """The model and variables of the newest readable checkpoint of a run.

  Reads no TFRecord and no optimizer state: the restore target comes from
  `jax.eval_shape` of the model's `init` on inputs shaped from the manifest.

  Args:
    config: the run's config (model fields, data.max_len).
    workdir: the run directory.
    manifest: the data the run was trained on (read from
      `manifest.data_dir_of(config, workdir)` when not given).
    directory: `CHECKPOINT_DIR`, `BEST_DIR`, or None for the serving choice
      (`inference_source`: best-by-recall when kept).

  Raises:
    UserError: no checkpoint, none readable, or trained on other data.
  """
  source = directory or inference_source(workdir)
  ckpt_dir = require_checkpoints(workdir, source)
  if manifest is None:
    manifest = manifest_lib.load(manifest_lib.data_dir_of(config, workdir))
  model = two_branch.from_manifest(config, manifest)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **two_branch.dummy_inputs(
          config, manifest)))
  ckpt = Checkpoints(ckpt_dir, config.train.keep_checkpoints, async_save=False)
  try:
    restored = ckpt.restore_latest(
        {k: abstract[k] for k in VARIABLE_FIELDS if k in abstract},
        check_meta=lambda m: check_same_data(m, manifest.sha256, workdir),
        partial=True)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'No readable checkpoint in {ckpt_dir!r}.')
  step, variables, _ = restored
  return Inference(model, dict(variables), int(step), source, manifest)
