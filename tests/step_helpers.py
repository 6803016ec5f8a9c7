"""Plans and one-step programs for tests of the train step."""

import dataclasses

import numpy as np

from mardjax import plan as plan_lib
from mardjax.train import train_step


def cpu_plan(config, devices: int = 1, **fields) -> plan_lib.Plan:
  """The config's plan on a CPU with `devices` devices, with `fields`
  replaced (e.g. text_layout='padded', positives='')."""
  plan = plan_lib.resolve(config, backend='cpu', devices=devices,
                          processes=1)
  return dataclasses.replace(plan, **fields)


def host_step(config, parallelism: str = 'single', mesh=None):
  """fn(state, batch, key) -> (state, metrics): one host-assembled step of
  `parallelism`'s program; its key is fold_in(key, 0)."""
  program = train_step.step_program(parallelism, config.loss, mesh=mesh)
  return lambda state, batch, key: program(state, None, batch, key,
                                           np.int32(0), train_step.Layout())
