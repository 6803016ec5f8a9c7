"""XLA flag defaults, applied before jax is imported (no jax import here).

XLA's CPU backend runs independent ops of one program concurrently by
default ("concurrency-optimized scheduler"). On a machine with few cores
the row gathers and scatters of the lazy embedding update then compete with
the backward pass for the same cores and memory bandwidth, and the `mean`
train step is slower with the scheduler than without it (the train
benchmark; see docs/performance.md). Only the CPU backend reads the flag.

On GPUs, jaxlib 0.10.2 to 0.11.0 (0.10.2 is this project's pin) compile an
f32 scatter-add to a compare-and-swap loop instead of the native atomic add
(an LLVM change: the native `atom.add.f32` flushes denormals), which under
repeated indices is reported hundreds of times slower
(https://github.com/jax-ml/jax/issues/38806, openxla/xla#46225; fixed in
0.11.1). Training's scatters are such: the mean encoder's sum of each
review's tokens into its row, the embedding table's gradient (the batch's
frequent words many times over). Where those versions and a CUDA plugin
are installed, the LLVM option that restores the native atomic is added
(`--xla_backend_extra_options=-nvptx-allow-ftz-atomics`; a denormal lost in
an atomic sum, as before 0.10.2). The workaround rests on the reports
above; a GPU benchmark record names the jax version it ran with
(docs/performance.md).

On CPU-only installs with glibc, freed memory is kept for reuse
(`keep_freed_memory`). XLA's CPU runtime allocates each execution's
buffers anew and frees them after it, tens of megabytes a `mean` step at
large batches; glibc hands blocks that large to fresh `mmap` pages (or,
from the runtime's worker threads, to per-thread heaps it trims), so every
step pays a page fault and the kernel's zeroing for each page it touches,
where a step served from a heap that keeps its memory touches none
(the train benchmark; see docs/performance.md). The price is that a
process keeps its peak heap until it exits. Accelerator installs are left
alone: their steps' buffers live on the device.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re

DEFAULTS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)

# jax versions whose GPU f32 scatter-add is a compare-and-swap loop.
SLOW_GPU_SCATTER = ((0, 10, 2), (0, 11, 0))
FTZ_ATOMICS = '-nvptx-allow-ftz-atomics'
_EXTRA_OPTIONS = '--xla_backend_extra_options='


def _jax_version() -> tuple[int, ...] | None:
  """The installed jax's version (not imported), or None."""
  try:
    version = importlib.metadata.version('jax')
  except importlib.metadata.PackageNotFoundError:
    return None
  match = re.match(r'(\d+)\.(\d+)\.(\d+)', version)
  return tuple(int(x) for x in match.groups()) if match else None


def _cuda_plugin_installed() -> bool:
  return any(importlib.util.find_spec(f'jax_cuda{v}_plugin') is not None
             for v in (12, 13))


def _accelerator_installed() -> bool:
  """A CUDA plugin or libtpu: jax would run the steps on a device."""
  return (_cuda_plugin_installed()
          or importlib.util.find_spec('libtpu') is not None)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Set to any value, the system allocator's own settings are kept.
SYSTEM_MALLOC_ENV = 'MARDJAX_SYSTEM_MALLOC'


def keep_freed_memory() -> bool:
  """Has glibc keep freed memory in one heap for reuse (module docstring):
  one arena for every thread, no block handed to `mmap`, the heap's top
  never given back. Skipped (False) where an accelerator plugin is
  installed, on other C libraries, or with `SYSTEM_MALLOC_ENV` set; call
  it before threads start allocating (before jax is imported)."""
  if (os.environ.get(SYSTEM_MALLOC_ENV) or _accelerator_installed()
      or platform.libc_ver()[0] != 'glibc'):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, 2**31 - 1)))  # The largest an int holds.


def _with_extra_option(flags: str, option: str) -> str:
  """`flags` with `option` among its --xla_backend_extra_options."""
  tokens = flags.split()
  for i, token in enumerate(tokens):
    if token.startswith(_EXTRA_OPTIONS):
      value = token[len(_EXTRA_OPTIONS):]
      tokens[i] = _EXTRA_OPTIONS + (f'{value},{option}' if value else option)
      return ' '.join(tokens)
  return ' '.join(tokens + [_EXTRA_OPTIONS + option])


def gpu_scatter_workaround(flags: str) -> str:
  """`flags` with the native-atomics LLVM option where the installed jax
  has the slow GPU scatter and a CUDA plugin (module docstring); as given
  where the user already chose (the option, or `--xla_gpu_ftz`)."""
  version = _jax_version()
  if (version is None or not SLOW_GPU_SCATTER[0] <= version
      <= SLOW_GPU_SCATTER[1] or not _cuda_plugin_installed()
      or FTZ_ATOMICS in flags or '--xla_gpu_ftz' in flags):
    return flags
  return _with_extra_option(flags, FTZ_ATOMICS)


def apply_defaults() -> None:
  """Adds each default to XLA_FLAGS unless the user already set that flag,
  and the GPU scatter workaround where it applies; keeps freed memory for
  reuse where that applies (`keep_freed_memory`)."""
  keep_freed_memory()
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in DEFAULTS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = gpu_scatter_workaround(flags)
