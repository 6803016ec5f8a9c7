"""`benchmark.kind=program`: what the compiled train step is made of.

On an accelerator a step at small and middling batches is bound by latency:
each top-level operation of the compiled program is at least one kernel
launch, and a `while` loop runs its body's kernels in series once an
iteration. Those counts, and XLA's cost model (floating-point operations and
bytes accessed), are properties of the compiled program, not of a machine's
speed, so they can be read on any backend. For each batch size of
`benchmark.batch_sizes` this compiles, on the default backend:

  * our step: training's own program (`train_step.step_program`, one step,
    the batch assembled on the device from indices) for the plan an
    accelerator gets (`plan.resolve(backend=benchmark.program_backend)`);
  * the plain probe (`plain_probe`): the same model and the paper's loss
    written as plainly as JAX allows, the reference for how few operations
    such a step needs;

and prints one line each: `ops` (instructions of the entry computation,
parameters, constants and tuples aside), `fusions`, `while_loops`, `sorts`,
`flops`, `bytes_accessed` (and as `gflop`, `gb_accessed`), our line also
the probe's counts and `ops_vs_plain`. `meets_targets`: no `while` loop beyond the random-number
generator's (the CPU lowering of its hash may keep one; `rng_while_loops`),
at most one sort, and at the largest batch size at most `OPS_VS_PLAIN`
times the probe's operations.
"""

import re
from typing import Any

import numpy as np

# Our step's operations at most this many times the plain probe's.
OPS_VS_PLAIN = 2.0

# Entry instructions that are not work: arguments, literals and tuples.
_BOOKKEEPING = frozenset({'parameter', 'constant', 'get-tuple-element',
                          'tuple', 'bitcast'})


def instruction(line: str) -> tuple[str, str] | None:
  """(shape text, opcode) of one HLO instruction line, or None for a line
  that is not one (a header, a comment, a closing brace)."""
  head, eq, rest = line.strip().partition(' = ')
  if not eq or not head or head.startswith('//'):
    return None
  rest = rest.lstrip()
  if rest.startswith('('):  # A tuple shape: up to its closing paren.
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        shape, rest = rest[:i + 1], rest[i + 1:]
        break
  else:
    shape, _, rest = rest.partition(' ')
  match = re.match(r'\s*([\w-]+)\(', rest)
  return (shape, match.group(1)) if match else None


def _instructions(block: str) -> list[str]:
  """The opcodes of one HLO computation's instructions, in order."""
  return [parsed[1] for parsed in map(instruction, block.splitlines())
          if parsed]


def _computations(hlo: str) -> dict[str, str]:
  """name -> body of each computation of an HLO module's text; the entry
  computation under 'ENTRY'."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      words = line.split()
      name = 'ENTRY' if words[0] == 'ENTRY' else words[0].lstrip('%')
      lines = []
    elif line.startswith('}') and name is not None:
      out[name] = '\n'.join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def hlo_counts(hlo: str) -> dict[str, int]:
  """Counts of an optimised HLO module's text (`Compiled.as_text()`):
  'ops' and 'fusions' of the entry computation, 'while_loops' and 'sorts'
  in the whole module, and 'rng_while_loops', the loops whose body is the
  random-number generator's hash (threefry: its bodies hold shifts and
  xors and no other work)."""
  comps = _computations(hlo)
  entry = [op for op in _instructions(comps.get('ENTRY', ''))
           if op not in _BOOKKEEPING]
  loops = sorts = rng_loops = 0
  for name, body in comps.items():
    ops = _instructions(body)
    sorts += ops.count('sort')
    loops += ops.count('while')
    for line in body.splitlines():
      match = re.search(r'\bwhile\(.*\bbody=%?([\w.-]+)', line)
      if match and _is_rng(comps, match.group(1)):
        rng_loops += 1
  return {'ops': len(entry), 'fusions': entry.count('fusion'),
          'while_loops': loops, 'sorts': sorts, 'rng_while_loops': rng_loops}


def _is_rng(comps: dict[str, str], name: str) -> bool:
  """Whether computation `name` (with what it calls) is a threefry round:
  rotations (shift-left, shift-right-logical, or) and xors of u32, no
  floating point, no gather, scatter, dot or reduction."""
  seen, todo, ops = set(), [name], []
  while todo:
    n = todo.pop()
    if n in seen or n not in comps:
      continue
    seen.add(n)
    ops += _instructions(comps[n])
    todo += re.findall(r'(?:calls|body|condition|to_apply)=%?([\w.-]+)',
                       comps[n])
  return ('xor' in ops and 'shift-left' in ops and not any(
      op in ops for op in ('dot', 'gather', 'scatter', 'reduce', 'sort')))


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # Older jax: one dict a computation.
    cost = cost[0] if cost else {}
  cost = cost or {}
  flops = float(cost.get('flops', 0.0))
  accessed = float(cost.get('bytes accessed', 0.0))
  return {'flops': flops, 'bytes_accessed': accessed,
          'gflop': round(flops / 1e9, 2), 'gb_accessed': round(accessed / 1e9, 2)}


def plain_probe(config, batch_size: int, vocab_size: int):
  """The same model and loss written plainly: (jitted step, its
  arguments). Mean of the words' embeddings of padded (b, max_len) tokens,
  each branch Dense-ReLU-Dense, batch-normalised with the batch's
  statistics and L2-normalised; the four hinge terms over full (b, b)
  distance matrices with K negatives an anchor drawn uniformly from the
  batch (the same album not excluded), each row's positive its own pair
  (cross-modal) or the other row of its album (rows 2i and 2i + 1); Adam."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mardjax.data import descriptors  # pylint: disable=g-import-not-at-top
  m, b, length = config.model, batch_size, config.data.max_len
  audio_dim = descriptors.dim(descriptors.parse_descriptor_list(
      config.data.descriptors))
  kind, _, k = config.loss.negatives.partition(':')
  k = int(k) if kind == 'sampled' else 10
  margin, weights = config.loss.margin, tuple(config.loss.weights)
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))

  def dense(n_in, n_out):
    return (jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
            jnp.zeros((n_out,)))
  params = {'embed': jax.random.normal(next(keys), (vocab_size, m.word_dim)),
            'text': [dense(m.word_dim, m.hidden_dim),
                     dense(m.hidden_dim, m.embed_dim)],
            'audio': [dense(audio_dim, m.hidden_dim),
                      dense(m.hidden_dim, m.embed_dim)]}
  tx = optax.adam(1e-3)

  def branch(x, layers):
    (w1, b1), (w2, b2) = layers
    y = jax.nn.relu(x @ w1 + b1) @ w2 + b2
    y = (y - y.mean(0)) / jnp.sqrt(y.var(0) + 1e-5)
    return y / jnp.linalg.norm(y, axis=1, keepdims=True)

  def term(x, y, positive, negative):
    dist = jnp.sqrt(jnp.maximum(
        (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T, 1e-12))
    pos = dist[jnp.arange(b), positive]
    neg = jnp.take_along_axis(dist, negative, 1)
    return jax.nn.relu(margin + pos[:, None] - neg).sum(1).mean()

  def loss(params, tokens, lengths, audio, key):
    mask = jnp.arange(length)[None] < lengths[:, None]
    words = params['embed'][tokens] * mask[..., None]
    text = branch(words.sum(1) / jnp.maximum(lengths, 1)[:, None],
                  params['text'])
    sound = branch(audio, params['audio'])
    neg = jax.random.randint(key, (4, b, k), 0, b)
    own, partner = jnp.arange(b), jnp.arange(b) ^ 1
    return (weights[0] * term(sound, text, own, neg[0])
            + weights[1] * term(text, sound, own, neg[1])
            + weights[2] * term(sound, sound, partner, neg[2])
            + weights[3] * term(text, text, partner, neg[3]))

  def step(params, opt_state, tokens, lengths, audio, key):
    value, grads = jax.value_and_grad(loss)(params, tokens, lengths, audio,
                                           key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  rng = np.random.default_rng(0)
  args = (params, tx.init(params),
          rng.integers(0, vocab_size, (b, length)).astype(np.int32),
          rng.integers(1, length + 1, b).astype(np.int32),
          rng.normal(size=(b, audio_dim)).astype(np.float32),
          jax.random.PRNGKey(1))
  return jax.jit(step, donate_argnums=(0, 1)), args


def our_step(config, batch_size: int, vocab_size: int, backend: str,
             devices: int = 1):
  """Training's own one-step program for the plan `backend` gets on
  `devices` devices (the process must have them), batch assembled on the
  device: (jitted program, its arguments placed as the step takes them,
  the plan)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import measuring  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  from mardjax.train import index_batches  # pylint: disable=g-import-not-at-top
  from mardjax.train import step_builder  # pylint: disable=g-import-not-at-top
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_size
  batch, reviews, audio = measuring.step_batch(config, vocab_size)
  plan = plan_lib.resolve(config, backend=backend, devices=devices,
                          processes=1)
  model = two_branch.build(
      config.model, vocab_size, dtype=train_step.compute_dtype(plan),
      bn_axis_name=train_step.AXIS if plan.parallel else None,
      lstm_loop=plan.lstm_loop)
  sample = {k: v[:batch_size // devices] for k, v in batch.items()}
  state = train_step.create_state(model, config, plan, jax.random.PRNGKey(0),
                                  sample)
  lazy = train_step.lazy_embedding(plan, state.params)
  planner = index_batches.Planner(config, plan, reviews,
                                  vocab_size if lazy else 0)
  rows = np.arange(batch_size).reshape(devices, -1)
  (_, item), = planner.with_plans(iter([((0, 0), {'rows': rows,
                                                  'tracks': rows})]))
  pmap = plan.parallelism == 'pmap'
  idx, layout = planner([item], pmap=pmap)
  tables = train_step.device_tables(reviews, audio, config.data.max_len)
  mesh = None
  if pmap:
    tables = train_step.replicate_tables(tables)
  elif plan.parallelism == 'shard_map':
    mesh = train_step.make_mesh()
    tables = jax.device_put(tables, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    idx = train_step.shard_batch(
        {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in idx.items()},
        mesh)
  state, sharding = step_builder.placed_state(plan, config, state, mesh)
  program = train_step.step_program(plan.parallelism, config.loss,
                                    max_len=config.data.max_len,
                                    device_assembly=True, mesh=mesh,
                                    sharding=sharding)
  return program, (state, tables, idx, jax.random.PRNGKey(1), np.int32(0),
                   layout), plan


def run_program(config, workdir: str) -> dict[str, Any]:
  """One line for our step and one for the plain probe at each batch
  size of `benchmark.batch_sizes` (the mean encoder)."""
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  del workdir
  b = config.benchmark
  config = config.copy_and_resolve_references()
  config.model.text_encoder = 'mean'
  vocab = config.data.vocab_size + 2
  sizes = [int(x) for x in b.batch_sizes.split(',') if x.strip()]
  lines = []
  for size in sizes:
    probe, probe_args = plain_probe(config, size, vocab)
    compiled = probe.lower(*probe_args).compile()
    plain = dict(hlo_counts(compiled.as_text()), **_cost(compiled))
    plain_line = dict(plain, benchmark='program_plain_probe',
                      batch_size=size, encoder='mean',
                      device=jax.devices()[0].platform)
    program, args, plan = our_step(config, size, vocab, b.program_backend)
    compiled = program.lower(*args).compile()
    ours = dict(hlo_counts(compiled.as_text()), **_cost(compiled))
    line = dict(ours, benchmark='program_train_step', batch_size=size,
                encoder='mean', plan_backend=plan.backend,
                embedding_update=plan.embedding_update,
                text_layout=plan.text_layout, positives=plan.positives,
                device=jax.devices()[0].platform,
                plain_ops=plain['ops'], plain_fusions=plain['fusions'],
                ops_vs_plain=round(ours['ops'] / max(plain['ops'], 1), 2))
    line['meets_targets'] = (
        ours['while_loops'] == ours['rng_while_loops'] and ours['sorts'] <= 1
        and (size != max(sizes) or line['ops_vs_plain'] <= OPS_VS_PLAIN))
    for one in (plain_line, line):
      print(json.dumps(one, sort_keys=True), flush=True)
    lines += [plain_line, line]
  return {'benchmarks': lines}
