"""Analyses for the server's tests: one that waits for the test's go-ahead,
one that takes all the memory it can, one that answers at once.

They run in the server's analysis processes (imported there by name, so
they live in a module of their own). `analyse_when_released` notes the
process it runs in under $MARDJAX_TEST_GATE, waits until the file `release`
appears there, then runs the real analysis. A test thus knows, without
relying on how fast anything is, that analyses are under way while it
sends other requests (or kills their worker).
"""

import os
import time

from mardjax.serve import audio_analysis

_real_analyse_bytes = audio_analysis.analyse_bytes


def analyse_when_released(data: bytes, ext: str, *args):
  gate = os.environ['MARDJAX_TEST_GATE']
  with open(os.path.join(gate, f'started-{os.getpid()}-{time.time_ns()}'),
            'w') as f:
    f.write(str(os.getpid()))
  deadline = time.monotonic() + 300  # A test that never releases fails.
  while not os.path.exists(os.path.join(gate, 'release')):
    if time.monotonic() > deadline:
      raise TimeoutError('the test never released the analysis')
    time.sleep(0.01)
  return _real_analyse_bytes(data, ext, *args)


def analyse_greedily(data: bytes, ext: str, *args):
  """Asks for 64 GiB, more than any worker's memory limit allows."""
  del data, ext, args
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.ones(2**33).sum()


def analyse_instantly(data: bytes, ext: str, *args):
  """The AcousticBrainz document at $MARDJAX_TEST_DOCUMENT, at once: for
  tests of the pool's life rather than of Essentia."""
  del data, ext, args
  from mardjax.data import mard_io  # pylint: disable=g-import-not-at-top
  with open(os.environ['MARDJAX_TEST_DOCUMENT'], 'rb') as f:
    return mard_io.loads_document(f.read())
