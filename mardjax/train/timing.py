"""Where a training run's wall time goes: `Clock`.

The loop asks the clock to time its parts (evaluation, checkpoints) and to
watch the loop itself, which adds jax's compilation time and program count
and keeps what setup left alive out of the garbage collector's way.
"""

import collections
import contextlib
import gc
import time
from typing import Iterator

import jax

# jax's monitoring events of a compilation's three stages (trace, lowering,
# XLA), in `jax._src.dispatch`; 'backend' counts the programs compiled.
_COMPILE_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
                   '/jax/core/compile/backend_compile_duration': 'backend'}


class Clock:
  """Wall seconds by part of a run, and the programs compiled.

  Attributes:
    seconds: seconds by part ('eval', 'checkpoint', 'compile', 'loop', and
      each part's share within the loop as 'loop_<part>').
    compiles: programs jax compiled while `loop` was open.
  """

  def __init__(self):
    self.seconds: collections.Counter = collections.Counter()
    self.compiles = 0

  @contextlib.contextmanager
  def part(self, name: str) -> Iterator[None]:
    """Adds the time spent inside to `seconds[name]`."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start

  def _listen(self, event: str, duration: float, **_) -> None:
    stage = _COMPILE_EVENTS.get(event)
    if stage:
      self.seconds['compile'] += duration
      self.compiles += stage == 'backend'

  @contextlib.contextmanager
  def loop(self) -> Iterator[None]:
    """Times the training loop: its wall time as 'loop', the compilation
    and parts inside it as 'loop_<part>'.

    Meanwhile the objects alive at its start (the model, the tables, jax's
    caches: hundreds of thousands at MARD's shape, living through the whole
    run) are frozen out of the garbage collector's full passes
    (`gc.freeze`), which would otherwise walk them all every few thousand
    steps; setup's garbage is collected first so that none of it is kept,
    and `gc.unfreeze` hands everything back at the end (a process may train
    again, as --mode=ablate does).
    """
    before = collections.Counter(self.seconds)
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    try:
      yield
    finally:
      jax.monitoring.unregister_event_duration_listener(self._listen)
      gc.unfreeze()
      self.seconds['loop'] = time.perf_counter() - start
      for name in ('eval', 'checkpoint', 'compile'):
        self.seconds[f'loop_{name}'] = self.seconds[name] - before[name]

  def rounded(self) -> dict[str, float]:
    return {k: round(v, 3) for k, v in self.seconds.items()}
