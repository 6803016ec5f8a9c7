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
  digests JSON: a checksum of every array of `state` (`array_digests`),
          computed from the bytes handed to the writer, in the same orbax
          save (committed with the arrays or not at all)

A restore hashes the arrays it read and compares (`ChecksumMismatch` when
one differs): a flipped byte in an array file reads back without an error
and often as finite values, which no other check would catch. Checkpoints
of formats 1 and 2 (before checksums; format 1 before the format_version
field) are read unverified, with a warning.
"""

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.models import two_branch

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'
# 3: the `digests` item.
FORMAT_VERSION = 3
_FIRST_WITH_DIGESTS = 3
DIGEST_ITEM = 'digests'
_DIGEST_ALGORITHM = 'blake2b-256'
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


class ChecksumMismatch(ValueError):
  """A checkpoint whose arrays read back with other bytes than were saved."""


def _leaf_name(path) -> str:
  """'params/audio_head/out/kernel': the same for a field of the train state
  and for the key of a dict of its fields (a partial restore's target)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _array_digest(x) -> str:
  """blake2b-256 of an array's dtype, shape and bytes."""
  x = np.ascontiguousarray(np.asarray(x))
  digest = hashlib.blake2b(digest_size=32)
  digest.update(f'{x.dtype.name}{x.shape}'.encode())
  # Hashed in place, without the copy of `tobytes` (hashlib releases the GIL
  # on buffers this size, so a background save does not hold the loop up).
  digest.update(x.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def array_digests(tree) -> dict[str, Any]:
  """The `digests` record of a tree of host arrays: each one's digest and
  dtype."""
  leaves = [(_leaf_name(path), np.asarray(leaf)) for path, leaf in
            jax.tree_util.tree_leaves_with_path(tree)]
  return {'algorithm': _DIGEST_ALGORITHM,
          'arrays': {name: _array_digest(x) for name, x in leaves},
          'dtypes': {name: x.dtype.name for name, x in leaves}}


def _as_saved(x, dtype_name: str | None):
  """`x` in the dtype it was saved with, when a restore target of another
  type (a Python int for the step counter) changed it and the change is
  exact; else `x` itself (which then fails its digest)."""
  x = np.asarray(x)
  if dtype_name is None or x.dtype.name == dtype_name:
    return x
  saved = x.astype(jnp.dtype(dtype_name))
  return saved if np.array_equal(saved.astype(x.dtype), x) else x


def _check_digests(tree, record: dict[str, Any]) -> None:
  """Raises ChecksumMismatch unless every array of `tree` (all the saved
  ones, or a partial restore's subset) hashes to its recorded digest."""
  if record.get('algorithm') != _DIGEST_ALGORITHM:
    raise ChecksumMismatch(f'unknown checksum algorithm '
                           f'{record.get("algorithm")!r}')
  recorded, dtypes = record['arrays'], record.get('dtypes', {})
  bad = []
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in leaves:
    name = _leaf_name(path)
    if recorded.get(name) != _array_digest(_as_saved(leaf,
                                                     dtypes.get(name))):
      bad.append(name)
  if bad:
    raise ChecksumMismatch(
        f'{len(bad)} of {len(leaves)} arrays differ from the checksums '
        f'recorded when it was saved (first: {bad[0]})')


class _DigestHandler(ocp.JsonCheckpointHandler):
  """Writes `array_digests` of the saved host arrays as JSON; the hashing
  happens in the write itself, so an asynchronous save does it on orbax's
  background thread while training goes on."""

  async def _save_fn(self, x, directory):
    # Only the primary host writes the file; the others need no digests.
    if ocp.multihost.is_primary_host(self._primary_host):
      x = x()
    await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_DigestHandler, for_save=True)
@dataclasses.dataclass
class _DigestSave(ocp.args.CheckpointArgs):
  """item: () -> the digests record, called when the item is written."""
  item: Callable[[], dict[str, Any]]


@ocp.args.register_with_handler(_DigestHandler, for_restore=True)
@dataclasses.dataclass
class _DigestRestore(ocp.args.CheckpointArgs):
  item: Any = None


def _shapes(tree):
  """Shapes and dtypes of a tree's arrays (keeps none of their memory)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          np.shape(x), x.dtype if hasattr(x, 'dtype') else
          np.asarray(x).dtype), tree)


class Checkpoints:
  """orbax CheckpointManager for the state, a JSON record of the run and the
  state's checksums."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = directory
    # The files are StandardSave's (which wraps the same tree handler):
    # checkpoints written by StandardSave read back unchanged.
    self.manager = ocp.CheckpointManager(
        directory, options=options, item_handlers={
            'state': _state_handler(), 'meta': ocp.JsonCheckpointHandler(),
            DIGEST_ITEM: _DigestHandler()})
    self._host_copy = _HostCopy()
    # The structure saved or restored last, for `newest_verified`.
    self._target = None

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    if step in self.manager.all_steps():
      # A resumed run reaching a step an earlier run also saved (e.g. the
      # best-by-recall copy written just before a crash): the new one wins.
      self.manager.wait_until_finished()
      self.manager.delete(step)
    meta = dict(meta, format_version=FORMAT_VERSION)
    if jax.process_count() == 1:
      # The previous save must be written before its buffers are reused.
      state = host = self._host_copy(state, self.manager.wait_until_finished)
    else:  # orbax's ArrayHandler copies global arrays itself.
      host = jax.device_get(state)  # This process's copy: the same bytes.
      state = _replicated_global(host)
    self._target = _shapes(host)
    # The digests are of the very buffers the writer reads; they stay
    # unchanged until the next save, which first waits for this one.
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        meta=ocp.args.JsonSave(meta),
        **{DIGEST_ITEM: _DigestSave(lambda: array_digests(host))}),
                      force=True)

  def restore_latest(self, abstract_state,
                     check_meta: Callable[[dict[str, Any]], None] | None = None,
                     partial: bool = False):
    """(step, state, meta) of the newest intact checkpoint, or None.

    Args:
      abstract_state: the structure to read (values unused): the whole train
        state, or with `partial` a subset of its fields as a dict.
      check_meta: called with the run record before the state is read; may
        raise (e.g. for another data manifest), which stops the restore.
      partial: read only the fields of `abstract_state` (inference).

    A newest checkpoint that cannot be read (a crash mid-write, a damaged
    disk), that reads back with NaN or infinite values, or whose arrays do
    not match the checksums recorded when it was saved, gets a warning, is
    moved aside, and the previous one is tried.
    """
    self._target = _shapes(abstract_state)
    target = _abstract(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      meta = self._meta(step)
      if meta is None:
        continue
      if check_meta is not None:
        check_meta(meta)
      state = self._state(step, meta, target, partial)
      if state is not None:
        return step, state, meta
    return None

  def restore_best(self, abstract_state,
                   check_meta: Callable[[dict[str, Any]], None] | None = None,
                   partial: bool = False):
    """As `restore_latest`, but the intact checkpoint with the highest dev
    recall@10 recorded for its own step (the first to reach it), then those
    without an evaluation of their step, newest first."""
    self._target = _shapes(abstract_state)
    target = _abstract(abstract_state)
    metas = {}
    for step in self.manager.all_steps():
      meta = self._meta(step)
      if meta is not None:
        metas[step] = meta

    def rank(step):
      recall = _own_recall(metas[step], step)
      return (0, -recall, step) if recall is not None else (1, -step, step)
    for step in sorted(metas, key=rank):
      if check_meta is not None:
        check_meta(metas[step])
      state = self._state(step, metas[step], target, partial)
      if state is not None:
        return step, state, metas[step]
    return None

  def _meta(self, step: int) -> dict[str, Any] | None:
    """The run record of `step`; None when unreadable (then set aside)."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      self._set_aside(step, e)
      return None
    if meta.get('format_version', 1) > FORMAT_VERSION:
      raise UserError(
          f'{self.directory}/{step} was written by a newer mardjax '
          f'(checkpoint format {meta["format_version"]}, this code reads '
          f'up to {FORMAT_VERSION}): update mardjax.')
    return meta

  def _state(self, step: int, meta: dict[str, Any], target, partial: bool):
    """The state of `step`, read, checked finite and verified; None when it
    is not intact (then set aside)."""
    args = ocp.args.PyTreeRestore(
        item=target, partial_restore=partial,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=args))
      state = _replicated_local(restored['state'])
      host = jax.device_get(state)  # One copy for both checks.
      _require_finite(host)
      self._verify(step, meta, host)
      return state
    except Exception as e:  # pylint: disable=broad-except
      self._set_aside(step, e)
      return None

  def _verify(self, step: int, meta: dict[str, Any], state) -> None:
    """Raises ChecksumMismatch unless `state` (host arrays), as read back,
    hashes to the digests saved with it (a checkpoint of a format before
    checksums: a warning)."""
    if (meta.get('format_version', 1) < _FIRST_WITH_DIGESTS and
        not os.path.isdir(os.path.join(self.directory, str(step),
                                       DIGEST_ITEM))):
      logging.warning('Checkpoint %s/%d has no checksums (written by an older '
                      'mardjax): its arrays are not verified.', self.directory,
                      step)
      return
    try:
      record = self.manager.restore(step, args=ocp.args.Composite(
          **{DIGEST_ITEM: _DigestRestore()}))[DIGEST_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise ChecksumMismatch(f'its checksums cannot be read ({e})') from e
    _check_digests(state, record)

  def newest_verified(self) -> int | None:
    """The step of the newest checkpoint that reads back intact (checksums
    matching, values finite), once the saves in flight are written; newer
    ones that do not are set aside, so a run resumes from this one.

    The structure read is the one saved or restored last by this object;
    None when there is none (nothing saved or restored yet).
    """
    self.wait()
    if self._target is None:
      return None
    found = self.restore_latest(self._target)
    return None if found is None else found[0]

  def set_aside(self, step: int, reason: str) -> str:
    """Moves the checkpoint of `step` under `unreadable_checkpoints/` beside
    this directory and returns where it went.

    Moved, not deleted (someone may want to look at it), so that a resumed
    run can write this step again.
    """
    self.manager.wait_until_finished()
    root = os.path.join(os.path.dirname(self.directory),
                        'unreadable_checkpoints')
    # The best-by-recall copy of a step lands beside the rolling one.
    prefix = '' if os.path.basename(self.directory) == CHECKPOINT_DIR else (
        os.path.basename(self.directory) + '-')
    aside = os.path.join(root, f'{prefix}{step}-{int(time.time())}')
    n = 1
    while os.path.exists(aside if n == 1 else f'{aside}.{n}'):
      n += 1
    aside = aside if n == 1 else f'{aside}.{n}'
    # Every process reads the same directory; one moves it.
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()
    logging.warning('Checkpoint %s/%d %s; moved it to %s.', self.directory,
                    step, reason, aside)
    return aside

  def _set_aside(self, step: int, error: Exception) -> None:
    # tensorstore's errors carry the whole store spec: its start says it.
    text = ' '.join(str(error).split())
    text = text if len(text) <= 300 else text[:300] + '...'
    self.set_aside(step, f'is unreadable ({type(error).__name__}: {text}), '
                   'falling back to the previous one')

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


def _own_recall(meta: dict[str, Any], step: int) -> float | None:
  """The dev recall@10 a checkpoint's record holds for its own step (the
  first evaluation of it), or None when that step was not evaluated."""
  for h in meta.get('history', []):
    if h.get('step') == step and 'recall@10' in h:
      return h['recall@10']
  return None


def _has_steps(directory: str) -> bool:
  """Whether `directory` holds a committed checkpoint step (orbax's
  unfinished ones carry a temporary suffix)."""
  return os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory))


def inference_source(workdir: str) -> str:
  """The checkpoint directory serving uses: the best-by-recall one when a
  run kept it (and it still holds a step), else the rolling checkpoints.
  `load_for_inference` falls back from a best-by-recall checkpoint that is
  not intact to the rolling ones."""
  return BEST_DIR if _has_steps(os.path.join(workdir, BEST_DIR)) else (
      CHECKPOINT_DIR)


def run_config(workdir: str) -> dict[str, Any] | None:
  """The config a run was trained with (as JSON), from the newest readable
  record of its serving checkpoints (or of the rolling ones); None when
  there is none."""
  for name in dict.fromkeys((inference_source(workdir), CHECKPOINT_DIR)):
    source = os.path.join(workdir, name)
    if not os.path.isdir(source):
      continue
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
  """The model and variables of the newest intact checkpoint of a run.

  Reads no TFRecord and no optimizer state: the restore target comes from
  `jax.eval_shape` of the model's `init` on inputs shaped from the manifest.
  With the serving choice, a best-by-recall checkpoint that is not intact
  (unreadable, not finite, or not matching its checksums; set aside) gives
  way to the intact rolling checkpoint with the best dev recall@10 recorded
  for its step (else the newest), with a warning line naming it.

  Args:
    config: the run's config (model fields, data.max_len).
    workdir: the run directory.
    manifest: the data the run was trained on (read from
      `manifest.data_dir_of(config, workdir)` when not given).
    directory: `CHECKPOINT_DIR`, `BEST_DIR`, or None for the serving choice
      (`inference_source`: best-by-recall when kept).

  Raises:
    UserError: no checkpoint, none intact, or trained on other data.
  """
  source = directory or inference_source(workdir)
  ckpt_dir = require_checkpoints(workdir, source)
  if manifest is None:
    manifest = manifest_lib.load(manifest_lib.data_dir_of(config, workdir),
                                 records=False)
  model = two_branch.from_manifest(config, manifest)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **two_branch.dummy_inputs(
          config, manifest)))
  target = {k: abstract[k] for k in VARIABLE_FIELDS if k in abstract}

  def restore(name, best):
    ckpt = Checkpoints(os.path.join(workdir, name),
                       config.train.keep_checkpoints, async_save=False)
    try:
      return (ckpt.restore_best if best else ckpt.restore_latest)(
          target, partial=True, check_meta=lambda m: check_same_data(
              m, manifest.sha256, workdir))
    finally:
      ckpt.close()
  restored = restore(source, best=False)
  if (restored is None and directory is None and source == BEST_DIR and
      _has_steps(os.path.join(workdir, CHECKPOINT_DIR))):
    ckpt_dir = f'{ckpt_dir} or {os.path.join(workdir, CHECKPOINT_DIR)}'
    restored = restore(CHECKPOINT_DIR, best=True)
    if restored is not None:
      step, _, meta = restored
      recall = _own_recall(meta, step)
      logging.warning(
          '%s holds no intact checkpoint; using step %d of %s instead (%s).',
          os.path.join(workdir, BEST_DIR), step,
          os.path.join(workdir, CHECKPOINT_DIR),
          f'dev recall@10 {recall:.4f}, the best of the rolling '
          'checkpoints' if recall is not None else 'the newest rolling checkpoint, none '
          'evaluated at its step')
      source = CHECKPOINT_DIR
  if restored is None:
    raise UserError(f'No readable checkpoint in {ckpt_dir}.')
  step, variables, _ = restored
  return Inference(model, dict(variables), int(step), source, manifest)
