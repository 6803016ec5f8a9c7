"""Train state, the per-device train step, and its compiled forms.

One step body (`per_device_step`: forward, loss, gradients, optax update,
metrics) serves every form `step_program` compiles:

  * one device: `jax.jit`;
  * 'pmap': `jax.pmap` over the local devices; batches shaped
    (devices, per_device_batch, ...); state passed unreplicated
    (`in_axes=None`) and returned unreplicated (`out_axes=None`);
  * 'shard_map': `jax.jit` of `jax.shard_map` over a 1-D mesh named
    'data'; batches shaped (devices * per_device_batch, ...) and sharded on
    their first axis;

each fed the batch (assembled on the host) or indices into tables kept on
the device (assembled there, `assemble`), one step or several in a
`lax.scan`. `mardjax.train.step_builder.build_step` picks the form from the
run's plan.

Gradients and metrics are averaged over the device axis with `lax.pmean`;
BatchNorm computes its statistics over the same axis, so the running averages
agree on every device.

With the plan's lazy embedding update (`mardjax.plan`) the word-embedding
table is trained row-sparse: batches carry 'slots' and 'vocab_ids' instead
of 'tokens' (`sparse_embedding.compact_batch`), the step differentiates only
the rows in the batch and updates them with lazy Adam; everything else goes
through optax as before. 'dense' trains the table like any other parameter.
"""

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
from flax import struct
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from mardjax import plan as plan_lib
from mardjax.data import tables as data_tables
from mardjax.models import layouts
from mardjax.train import losses
from mardjax.train import packing
from mardjax.train import sharded_optimizer
from mardjax.train import sparse_embedding

AXIS = 'data'


class TrainState(train_state.TrainState):
  """Params, optimizer state, step, and BatchNorm statistics (may be empty).

  Under lazy embedding updates `opt_state` covers every parameter but the
  embedding table, `embed_opt` holds the table's Adam moments and
  `embed_tx` its update rule (`sparse_embedding.lazy_adam` with the
  config's learning rate); both are None otherwise.
  """
  batch_stats: Any = None
  embed_opt: Any = None
  embed_tx: Callable | None = struct.field(pytree_node=False, default=None)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`train.learning_rate`, scaled with the batch by `train.lr_scaling`:
  'none', 'linear' (x batch / lr_base_batch) or 'sqrt' (x its square
  root, Adam's usual rule: the update's noise falls with the root of the
  batch)."""
  t = config.train
  ratio = t.batch_size / t.lr_base_batch
  return t.learning_rate * {'none': 1.0, 'linear': ratio,
                            'sqrt': ratio ** 0.5}[t.lr_scaling]


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           num_steps: int | None = None) -> optax.Schedule:
  """step -> learning rate: a linear warmup over `train.warmup_steps` to
  `peak_learning_rate`, then constant or (`train.lr_schedule='cosine'`) a
  cosine decay to `train.lr_final_fraction` of it at `num_steps`."""
  t = config.train
  peak = peak_learning_rate(config)
  warmup = int(t.warmup_steps)
  if t.lr_schedule == 'cosine':
    if not num_steps:
      raise ValueError('A cosine schedule needs the run\'s number of steps.')
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(num_steps, warmup + 1),
        end_value=peak * t.lr_final_fraction)
  if warmup:
    return optax.linear_schedule(0.0, peak, warmup)
  return optax.constant_schedule(peak)


def create_state(model: nn.Module, config: ml_collections.ConfigDict,
                 plan: plan_lib.Plan, rng: jax.Array,
                 sample: dict[str, np.ndarray],
                 num_steps: int | None = None) -> TrainState:
  """Initialises parameters from one (per-device) sample batch; optax Adam
  on `learning_rate_schedule` (paper: constant 1e-3), whose decaying forms
  need `num_steps` (the run's length). The plan's lazy embedding update
  reads the same schedule."""
  variables = model.init(rng, audio=sample['audio'], tokens=sample['tokens'],
                         lengths=sample['lengths'],
                         text_features=sample.get('text_features'),
                         num_tracks=sample.get('num_tracks'), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  schedule = learning_rate_schedule(config, num_steps)
  tx = optax.adam(schedule)
  if not lazy_embedding(plan, params):
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=batch_stats)
  table, rest = sparse_embedding.split_table(params)
  return TrainState(
      step=0, apply_fn=model.apply, params=params, tx=tx,
      opt_state=tx.init(rest), batch_stats=batch_stats,
      embed_opt=sparse_embedding.init(table),
      embed_tx=functools.partial(sparse_embedding.lazy_adam,
                                 learning_rate=schedule))


def set_word_scores(state: TrainState, scores: np.ndarray) -> TrainState:
  """The state with the word scores of the weighted mean encoder (the
  embedding table's last column, `two_branch.MeanEncoder`) set to
  `scores` (V,)."""
  table, rest = sparse_embedding.split_table(state.params)
  table = table.at[:, -1].set(jnp.asarray(scores, table.dtype))
  return state.replace(params=sparse_embedding.merge_table(table, rest))


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(plan: plan_lib.Plan):
  """The dtype of training's products and activations (the plan's
  `compute_dtype`); parameters and optimizer state stay float32."""
  return DTYPES[plan.compute_dtype]


def lazy_embedding(plan: plan_lib.Plan, params) -> bool:
  """Whether the embedding table of `params` is trained row-sparse."""
  return (plan.embedding_update == 'lazy'
          and sparse_embedding.has_table(params))


class ProcessSync:
  """Host-side agreement between the processes of a multi-host run.

  Every device of a run must see arrays of one shape and, for lazy
  embedding updates, one list of word ids: batch preparation combines what
  the processes computed from their own shares of the batch.
  """

  def any(self, mask: np.ndarray) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(mask)).any(0)

  def max(self, value: int) -> int:
    return int(np.asarray(multihost_utils.process_allgather(
        np.int64(value))).max())


class ProgramSizes:
  """Sizes of a batch's lists that reuse a program compiled before.

  The split bag-of-words' word list ('vocab', U) and token list ('rare',
  R) vary from batch to batch, and each new pair of sizes would compile the
  step again (seconds each, at paper sizes). A batch whose lists fit a pair met
  before takes the smallest such pair instead (padding, which changes no
  parameter); only a batch too large for every one of them adds its own.
  The flat layout's size is kept the same way (`index_batches.Planner`).
  R is first agreed between processes (the largest); every process builds
  the same word list, so all of them pick the same pair.
  """

  def __init__(self, sync: ProcessSync | None = None):
    self.sync = sync
    self.seen: list[dict[str, int]] = []

  def __call__(self, want: dict[str, int]) -> dict[str, int]:
    if self.sync and 'rare' in want:
      want = dict(want, rare=self.sync.max(want['rare']))
    fits = [s for s in self.seen
            if all(s[k] >= v for k, v in want.items())]
    if fits:
      return min(fits, key=lambda s: sum(s.values()))
    self.seen.append(dict(want))
    return want


def prepare_batch(state: TrainState, batch: dict[str, np.ndarray],
                  plan: plan_lib.Plan, vocab_bucket: int,
                  sync: ProcessSync | None = None,
                  sizes: ProgramSizes | None = None,
                  widths: ProgramSizes | None = None
                  ) -> dict[str, np.ndarray]:
  """The host-side batch transform the state's step expects (numpy).

  Args:
    state: the train state (lazy or dense embedding updates).
    batch: (D, b, ...) arrays from `input_pipeline.train_batches`.
    plan: the run's plan: its `text_layout` ('packed': the reviews end to
      end in rows, `pack_rows` a multiple, `mardjax.train.packing`; 'flat':
      'flat_review' (D, T), T a multiple of `token_bucket`,
      `layouts.flat_review`; 'split_bag': the lazy update's
      'rare_tokens', `sparse_embedding.compact_batch`) and its `positives`
      ('local' or 'across': each row's positives for the ranking loss's
      hinges, 'positives' (D, b, W), `losses.positive_lists`, among its
      device's rows or every device's).
    vocab_bucket: `config.train.vocab_bucket`.
    sync: with several processes, combines their row counts and word ids.
    sizes: the run's `ProgramSizes` for the split bag-of-words' lists;
      None: this batch's own (agreed between processes).
    widths: the run's `ProgramSizes` for W; None: this batch's own.
  """
  batch = dict(batch)
  if plan.positives:
    batch['positives'] = losses.positive_lists(
        batch['album'], plan.positives == 'across',
        lambda w: program_width(w, sync, widths))
  if plan.text_layout == 'packed':
    batch.update(packing.pack(batch['tokens'], batch['lengths'],
                              plan.pack_rows, sync.max if sync else None))
  if plan.text_layout == 'flat':
    batch['flat_review'] = layouts.flat_review(
        np.minimum(batch['lengths'], batch['tokens'].shape[-1]),
        plan.token_bucket, sync.max if sync else None)
  if state.embed_tx is None:
    return batch
  table, _ = sparse_embedding.split_table(state.params)
  return sparse_embedding.compact_batch(
      batch, table.shape[0], vocab_bucket, sync.any if sync else None,
      plan.split_bag, sizes or ProgramSizes(sync))


def program_width(width: int, sync: ProcessSync | None = None,
                  widths: ProgramSizes | None = None) -> int:
  """A positive-list width every process and a compiled program agree on:
  the largest of the processes', then the run's smallest fitting one
  (`ProgramSizes`)."""
  if sync:
    width = sync.max(width)
  return widths({'positives': width})['positives'] if widths else width


def compute_loss(audio: jax.Array, text: jax.Array, album: jax.Array,
                 key: jax.Array, loss_config: ml_collections.ConfigDict,
                 axis_name: str | None,
                 positives: jax.Array | int | None = None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  """The configured loss of one device's embeddings; (loss, terms).
  `positives`: the batch's positive lists (`prepare_batch`), or their
  width (`assemble`: the loss makes them), if any."""
  gather = loss_config.gather_across_devices and axis_name is not None
  return losses.LOSSES[loss_config.kind](
      audio, text, album, config=loss_config, key=key, axis_name=axis_name,
      gather=gather, positives=positives)


# Dropout's keys: the step key folded with this, apart from the loss's draws.
_DROPOUT_STREAM = 0x5D


def all_finite(tree) -> jax.Array:
  """() bool: every element of every array of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree_util.tree_leaves(tree)]))


def _optimizer_step(tx, opt_state, params, grads, sharding, axis_name):
  """optax's update of `params` (the optimizer's tree): (new params, new
  optimizer state, gradient norm). With `sharding`, `grads` are this
  device's shares (`sharded_optimizer.reduce_gradients`) and the moments
  its rows."""
  if sharding is not None:
    return sharded_optimizer.apply_updates(tx, opt_state, params, grads,
                                           sharding, axis_name)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state,
          optax.global_norm(grads))


def _update(state: TrainState, params, grads, row_grads,
            vocab_ids: jax.Array | None, sharding=None, axis_name=None):
  """The optimizer update; returns (new state, gradient norm, what the
  step's finiteness check reads besides: the new parameters, or under lazy
  updates the dense ones).

  Under lazy updates `params` are all but the embedding table, whose rows
  `vocab_ids` get `row_grads`; otherwise `params` are all of them. With
  `sharding` (`sharded_optimizer.Sharding`) the large leaves' moments are
  this device's rows and `grads` its shares of theirs.
  """
  new_params, opt_state, grad_norm = _optimizer_step(
      state.tx, state.opt_state, params, grads, sharding, axis_name)
  if vocab_ids is None:
    # The new parameters are read back: a finite gradient does not make
    # them finite when the learning rate times the update overflows
    # float32 (a rate finite in float64, beyond float32's range).
    new_state = state.replace(step=state.step + 1, params=new_params,
                              opt_state=opt_state)
    return new_state, grad_norm, new_params
  # Every device holds the same vocab_ids, so the averaged row gradients
  # are the rows of the averaged dense gradient.
  table, _ = sparse_embedding.split_table(state.params)
  table, embed_opt = state.embed_tx(table, state.embed_opt, vocab_ids,
                                    row_grads, state.step + 1)
  new_state = state.replace(
      step=state.step + 1, opt_state=opt_state, embed_opt=embed_opt,
      params=sparse_embedding.merge_table(table, new_params))
  grad_norm = jnp.sqrt(grad_norm ** 2 + jnp.sum(row_grads ** 2))
  # Only the batch's rows of the table changed, and a finite gradient norm
  # (checked with what this returns) makes their Adam moments and update
  # finite; the rows were finite before (the step before was checked), so
  # they are after. Reading them back to check would cost a twentieth of a
  # CPU step.
  return new_state, grad_norm, new_params


def _average_gradients(grads, row_grads, axis_name: str | None,
                       sharding: sharded_optimizer.Sharding | None):
  """The gradients averaged over the devices: whole (an all-reduce), or
  for the sharded leaves this device's rows (a reduce-scatter)."""
  if sharding is not None:
    return (sharded_optimizer.reduce_gradients(grads, sharding, axis_name),
            jax.lax.pmean(row_grads, axis_name))
  if axis_name is not None:
    return jax.lax.pmean((grads, row_grads), axis_name)
  return grads, row_grads


def per_device_step(state: TrainState, batch: dict[str, jax.Array],
                    key: jax.Array, *, loss_config: ml_collections.ConfigDict,
                    axis_name: str | None,
                    sharding: sharded_optimizer.Sharding | None = None
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Args:
    state: the (replicated) train state.
    batch: 'audio' (b, A), 'tokens' (b, L), 'lengths' (b,), 'album' (b,);
      under lazy embedding updates 'slots' (b, L) and 'vocab_ids' (U,)
      in place of 'tokens'; packed (LSTM) batches hold (R, L) token rows
      and the packing markers; for the ranking loss's hinges
      'positives' (b, W) (`prepare_batch`), or W, the lists made in
      the step (`assemble`).
    key: PRNG key for this step (same on every device; folded per device).
    loss_config: config.loss.
    axis_name: device axis name, or None on one device.
    sharding: the optimizer state's rows split over `axis_name`
      (`sharded_optimizer`; the state holds this device's rows of the
      sharded moments), or None: replicated.

  Returns:
    (new state, metrics averaged over devices); metrics['finite'] is 1.0
    when the loss, the gradient norm and every parameter the step changed
    are finite on every device, else below 1.
  """
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  has_bn = bool(state.batch_stats)
  lazy = state.embed_tx is not None
  if lazy != ('vocab_ids' in batch):
    raise ValueError('This state trains its embedding table ' + (
        'row-sparse' if lazy else 'densely') + ': pass batches through '
        'train_step.prepare_batch.')
  if lazy:
    table, params = sparse_embedding.split_table(state.params)
    rows = sparse_embedding.gather_rows(table, batch['vocab_ids'])
    text = {'tokens': batch['slots']}
  else:
    params, rows = state.params, None
    text = {'tokens': batch['tokens']}
  if 'starts' in batch:
    text['packed'] = {k: batch[k] for k in packing.KEYS if k != 'tokens'}
  for name in ('flat_review', 'rare_tokens', 'text_features'):
    if name in batch:
      text[name] = batch[name]
  if 'num_tracks' in batch:  # The album LSTM: (b, T, A) audio.
    text['num_tracks'] = batch['num_tracks']

  def loss_fn(params, rows):
    variables = {'params': params}
    if has_bn:
      variables['batch_stats'] = state.batch_stats
    out, updates = state.apply_fn(
        variables, audio=batch['audio'], lengths=batch['lengths'], train=True,
        text_table=rows, mutable=['batch_stats'] if has_bn else [],
        rngs={'dropout': jax.random.fold_in(key, _DROPOUT_STREAM)}, **text)
    loss, terms = compute_loss(out['audio'], out['text'], batch['album'], key,
                               loss_config, axis_name, batch.get('positives'))
    return loss, (terms, updates)

  (loss, (terms, updates)), (grads, row_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, rows)
  grads, row_grads = _average_gradients(grads, row_grads, axis_name,
                                        sharding)
  new_state, grad_norm, changed = _update(state, params, grads, row_grads,
                                          batch.get('vocab_ids'), sharding,
                                          axis_name)
  if has_bn:
    new_state = new_state.replace(batch_stats=updates['batch_stats'])
    changed = (changed, updates['batch_stats'])
  # A hinge of NaN distances clamps to 0, so a diverged run can show a loss
  # of exactly 0: finiteness is checked on what the step wrote, not the loss.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(changed)
  metrics = {'loss': loss, **terms, 'grad_norm': grad_norm,
             'finite': finite.astype(jnp.float32)}
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return new_state, metrics


class DeviceTables(NamedTuple):
  """The training data on the device, for steps that assemble their batch
  there from indices (`step_program`): no token array crosses to the device
  per step.

  Attributes:
    tokens: (total tokens + max_len,) int32, every review end to end, then
      zeros (so a gather of max_len past the last review stays in bounds).
    offsets, lengths, album: (N,) int32 per review.
    descriptors: (tracks, A) float32 normalised track descriptors.
    track_offsets, track_counts: (albums,) int32, each album's first row
      of `descriptors` and its number of tracks (the album LSTM's).
    features: (N, F) float32 pretrained text features, or None.
  """
  tokens: jax.Array
  offsets: jax.Array
  lengths: jax.Array
  album: jax.Array
  descriptors: jax.Array
  track_offsets: jax.Array
  track_counts: jax.Array
  features: jax.Array | None


def device_tables(reviews, audio, max_len: int, sharding=None
                  ) -> DeviceTables:
  """Copies a `tables.ReviewTable` and `tables.AudioTable` to the default
  device (or to `sharding`'s devices, e.g. replicated over a mesh), once
  per run."""
  if len(reviews.tokens) + max_len >= 2**31:
    raise ValueError('device_tables: more than 2**31 tokens.')
  tokens = np.concatenate([reviews.tokens.astype(np.int32),
                           np.zeros(max_len, np.int32)])
  features = (None if reviews.features is None
              else reviews.features.astype(np.float32))
  return DeviceTables(*(jax.device_put(x, sharding) for x in (
      tokens, reviews.offsets.astype(np.int32),
      reviews.lengths.astype(np.int32), reviews.album.astype(np.int32),
      audio.descriptors.astype(np.float32),
      audio.offsets.astype(np.int32), audio.counts.astype(np.int32),
      features)))


class Layout(NamedTuple):
  """The static sizes of a device-assembled batch, which the host picks per
  dispatch (the text layout's from the batch's lengths, bucketed so that
  few programs compile).

  Attributes:
    num_tokens: > 0: the mean encoder's flat layout, 'flat_review'
      (num_tokens,), as `layouts.flat_review` builds it.
    packed_rows: > 0: the LSTM encoder's packed layout of that many rows,
      built from the host's plan, idx['place'] (`packing.plan`).
    album_tracks: > 0: the album LSTM's audio, each review's album's first
      `album_tracks` tracks (`tables.AudioTable.sequences`).
    rare_tokens: not None: the lazy update's split bag-of-words,
      'rare_tokens' (rare_tokens,) (`sparse_embedding.compact_batch`).
    positive_width: > 0: the ranking loss's lists of each row's positives
      are made in the step, this wide (`losses.device_positive_lists`;
      what `prepare_batch` sends as 'positives' (b, W)).
  """
  num_tokens: int = 0
  packed_rows: int = 0
  album_tracks: int = 0
  rare_tokens: int | None = None
  positive_width: int = 0


def assemble(tables: DeviceTables, idx: dict[str, jax.Array], max_len: int,
             layout: Layout = Layout(), vocab_size: int = 0
             ) -> dict[str, jax.Array]:
  """The batch of `input_pipeline.make_batch` plus its audio, gathered on
  the device from idx 'rows' (b,) review rows and 'tracks' (b,) descriptor
  rows: 'tokens' (b, max_len), 'lengths' (b,), 'album' (b,), 'audio'
  (b, A) (the album LSTM's (b, T, A) and 'num_tracks' (b,) with
  `layout.album_tracks`), 'text_features' (b, F) when the tables hold
  them; then, as `prepare_batch` would give it on the host, the text in
  `layout`: 'flat_review', or packed rows and their markers (replacing
  'tokens'; `packing.pack_on_device`, from idx 'place' (b, 2)); and for
  the lazy update, given idx 'vocab_ids' (U,) (the batch's distinct words,
  `sparse_embedding.padded_ids`) and the table's `vocab_size`, 'slots'
  in place of the tokens (and 'rare_tokens' with `layout.rare_tokens`);
  'positives', the width W of the positive lists the loss makes
  (`layout.positive_width`), where `prepare_batch` sends the (b, W)
  lists."""
  rows = idx['rows']
  lengths = tables.lengths[rows]
  pos = jnp.arange(max_len)
  valid = pos[None, :] < lengths[:, None]
  tokens = jnp.where(valid, tables.tokens[tables.offsets[rows][:, None] +
                                          pos[None, :]], 0)
  album = tables.album[rows]
  batch = {'tokens': tokens, 'lengths': lengths, 'album': album}
  if layout.album_tracks:
    batch['audio'], batch['num_tracks'] = data_tables.album_sequences(
        tables.descriptors, tables.track_offsets, tables.track_counts, album,
        layout.album_tracks, jnp)
  else:
    batch['audio'] = tables.descriptors[idx['tracks']]
  if tables.features is not None:
    batch['text_features'] = tables.features[rows]
  if layout.num_tokens:
    batch['flat_review'] = layouts.flat_owner(
        jnp.minimum(lengths, max_len), layout.num_tokens)
  if layout.packed_rows:
    batch.update(packing.pack_on_device(tokens, jnp.minimum(lengths, max_len),
                                        idx['place'], layout.packed_rows))
  if layout.positive_width:
    batch['positives'] = layout.positive_width
  if 'vocab_ids' in idx:
    batch['slots'] = sparse_embedding.slots_on_device(
        batch.pop('tokens'), idx['vocab_ids'], vocab_size)
    batch['vocab_ids'] = idx['vocab_ids']
    if layout.rare_tokens is not None:
      batch['rare_tokens'] = layouts.rare_tokens(
          layouts.rare_mask(batch['slots'], lengths).reshape(-1),
          layout.rare_tokens)
  return batch


def replicate_tables(tables: DeviceTables, devices=None) -> DeviceTables:
  """One copy of the tables per local device, stacked on a leading axis
  (what the pmap form of `step_program` maps over)."""
  devices = list(devices or jax.local_devices())
  sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))

  def stacked(x):
    # Each device's copy goes there directly: no (D, ...) array on the host.
    return jax.make_array_from_single_device_arrays(
        (len(devices), *x.shape), sharding,
        [jax.device_put(x[None], d) for d in devices])
  return DeviceTables(*(None if x is None else stacked(x) for x in tables))


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))


def _program_body(loss_config, max_len: int, axis_name: str | None,
                  device_assembly: bool, scan: bool,
                  sharding: sharded_optimizer.Sharding | None = None
                  ) -> Callable:
  """body(state, tables, inputs, base_key, step0, layout) -> (state,
  metrics) on one device's share: `inputs` is the batch itself (host
  assembly) or the indices `assemble` builds it from (device assembly);
  step i's key is fold_in(base_key, step0 + i). With `scan`, inputs have a
  leading axis of n steps run in one `lax.scan`, and the metrics are the
  last step's with 'finite' the least over the n."""
  def one(state, tables, inputs, key, layout):
    if device_assembly:
      vocab_size = (sparse_embedding.split_table(state.params)[0].shape[0]
                    if state.embed_tx is not None else 0)
      inputs = assemble(tables, inputs, max_len, layout, vocab_size)
    return per_device_step(state, inputs, key, loss_config=loss_config,
                           axis_name=axis_name, sharding=sharding)

  def body(state, tables, inputs, base_key, step0, layout):
    if not scan:
      return one(state, tables, inputs, jax.random.fold_in(base_key, step0),
                 layout)

    def each(state, xs):
      i, step_inputs = xs
      return one(state, tables, step_inputs,
                 jax.random.fold_in(base_key, step0 + i), layout)
    n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    state, metrics = jax.lax.scan(each, state, (jnp.arange(n), inputs))
    last = jax.tree_util.tree_map(lambda x: x[-1], metrics)
    return state, dict(last, finite=jnp.min(metrics['finite']))
  return body


def step_program(parallelism: str, loss_config, *, max_len: int = 0,
                 device_assembly: bool = False, scan: bool = False,
                 mesh: Mesh | None = None,
                 sharding: sharded_optimizer.Sharding | None = None
                 ) -> Callable:
  """The compiled train step of one form:
  fn(state, tables, inputs, base_key, step0, layout) -> (state, metrics).

  Args:
    parallelism: the plan's 'single' (jit on one device; inputs' arrays
      (b, ...)), 'pmap' (over the local devices; inputs (D, b, ...), tables
      with a leading device axis, `replicate_tables`; state unreplicated
      in and out) or 'shard_map' (jit of shard_map over `mesh`; inputs
      (D * b, ...), device d's share at [d * b:(d + 1) * b]; state and
      tables replicated on the mesh).
    loss_config: config.loss.
    max_len: reviews' token limit (device assembly).
    device_assembly: inputs are indices into `tables` (`DeviceTables`,
      `assemble`); else the batch itself (`prepare_batch`) and tables None.
    scan: inputs carry n steps on an axis after the device axis (pmap:
      (D, n, b, ...); otherwise (n, D * b, ...)), run in one dispatch.
    mesh: shard_map's mesh (`make_mesh`).
    sharding: shard_map only: the optimizer leaves whose moments are split
      by rows over the mesh (`sharded_optimizer`; the state placed by
      `place_state`), or None: the whole state replicated.

  base_key is a PRNG key, step0 an int32 scalar (the first step's number),
  `layout` a static `Layout`. The jit forms donate the incoming state: the
  step returns a new one, and XLA reuses the old buffers (params, Adam
  moments) in place. pmap does not: its unmapped state is broadcast to the
  devices first, so there is nothing to reuse, and donating it breaks
  multi-process runs ("Array has been deleted").
  """
  axis = None if parallelism == 'single' else AXIS
  if sharding is not None and parallelism != 'shard_map':
    raise ValueError('A sharded optimizer state needs the shard_map step.')
  body = _program_body(loss_config, max_len, axis, device_assembly, scan,
                       sharding)
  if parallelism == 'pmap':
    return jax.pmap(body, axis_name=AXIS,
                    in_axes=(None, 0 if device_assembly else None, 0, None,
                             None),
                    out_axes=None, static_broadcasted_argnums=5)
  if parallelism == 'shard_map':
    # check_vma=False gives the body pmap's semantics: jax.grad inside it is
    # the gradient of this device's loss, and the body's own pmean averages
    # them. (With varying-axis checking on, grads of replicated params come
    # out already summed over devices and the body would need another form.)
    def sharded(state, tables, inputs, base_key, step0, layout):
      specs = state_specs(state, sharding)
      return jax.shard_map(
          functools.partial(body, layout=layout), mesh=mesh,
          in_specs=(specs, P(), P(None, AXIS) if scan else P(AXIS), P(),
                    P()),
          out_specs=(specs, P()), check_vma=False)(
              state, tables, inputs, base_key, step0)
    return jax.jit(sharded, donate_argnums=0, static_argnums=5)
  return jax.jit(body, donate_argnums=0, static_argnums=5)


def optimizer_params(state: TrainState):
  """The tree the state's optax transformation updates: every parameter,
  or under lazy embedding updates all but the table."""
  if state.embed_tx is None:
    return state.params
  return sparse_embedding.split_table(state.params)[1]


def state_specs(state: TrainState,
                sharding: sharded_optimizer.Sharding | None):
  """shard_map's partition specs of the state: replicated, but for the
  sharded optimizer moments (`sharded_optimizer.state_specs`)."""
  specs = jax.tree_util.tree_map(lambda _: P(), state)
  if sharding is None:
    return specs
  return specs.replace(opt_state=sharded_optimizer.state_specs(
      state.tx, state.opt_state, optimizer_params(state), sharding, AXIS))


def place_state(state: TrainState, mesh: Mesh,
                sharding: sharded_optimizer.Sharding | None) -> TrainState:
  """The state on `mesh` as `step_program`'s shard_map form takes it:
  replicated, with the sharded moments padded and split by rows."""
  whole = NamedSharding(mesh, P())
  if sharding is None:
    return jax.device_put(state, whole)
  opt_state = sharded_optimizer.place(
      state.tx, state.opt_state, optimizer_params(state), sharding, mesh)
  rest = jax.device_put(state.replace(opt_state=None), whole)
  return rest.replace(opt_state=opt_state)


def saveable_state(state: TrainState,
                   sharding: sharded_optimizer.Sharding | None
                   ) -> TrainState:
  """The state as checkpoints hold it whatever the device count: the
  sharded moments unpadded, in their parameters' shapes."""
  if sharding is None:
    return state
  return state.replace(opt_state=sharded_optimizer.unpadded(
      state.tx, state.opt_state, optimizer_params(state), sharding))


def optimizer_sharding(state: TrainState, plan: plan_lib.Plan,
                       min_size: int) -> sharded_optimizer.Sharding | None:
  """The plan's optimizer sharding for this state: the large leaves of
  `optimizer_params` (`sharded_optimizer.plan`) under
  plan.optimizer_sharding == 'sharded', else None."""
  if plan.optimizer_sharding != 'sharded':
    return None
  return sharded_optimizer.plan(optimizer_params(state), plan.devices,
                                min_size)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh
                ) -> dict[str, jax.Array]:
  """(devices, b, ...) numpy -> (devices * b, ...) arrays sharded over 'data'."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.device_put(v.reshape(-1, *v.shape[2:]), sharding)
          for k, v in batch.items()}
