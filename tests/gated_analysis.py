"""An analysis that waits for the test's go-ahead, for the server's tests.

It runs in the server's analysis processes (imported there by name, so it
lives in a module of its own): each call notes the process it runs in under
$MARDJAX_TEST_GATE, waits until the file `release` appears there, then runs
the real analysis. A test thus knows, without relying on how fast anything
is, that analyses are under way while it sends other requests.
"""

import os
import time

from mardjax.serve import audio_analysis

_real_analyse_bytes = audio_analysis.analyse_bytes


def analyse_when_released(data: bytes, ext: str):
  gate = os.environ['MARDJAX_TEST_GATE']
  with open(os.path.join(gate, f'started-{os.getpid()}-{time.time_ns()}'),
            'w') as f:
    f.write(str(os.getpid()))
  deadline = time.monotonic() + 300  # A test that never releases fails.
  while not os.path.exists(os.path.join(gate, 'release')):
    if time.monotonic() > deadline:
      raise TimeoutError('the test never released the analysis')
    time.sleep(0.01)
  return _real_analyse_bytes(data, ext)
