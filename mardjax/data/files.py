"""Input files that cannot hang or explode a run, and outputs that are whole.

Reading. A folder handed to mardjax (the raw MARD directory, the descriptor
directories, `--mode=embed`'s input folder) may hold things that are not
documents: a FIFO named `x.json` (opening it blocks until a writer comes),
a link to `/dev/zero` (endless bytes), a link loop, a dangling link, a link
to somewhere outside the folder. `check` looks at each path with `lstat` and
`stat` before anything opens it and names what is wrong; `walk` lists a
folder's regular files and counts the rest under those reasons; `read_bytes`
opens with `O_NONBLOCK` (a FIFO swapped in after the check cannot block),
checks the open file again with `fstat`, and reads at most a cap.

Writing. A full disk (ENOSPC, EDQUOT), a read-only one (EROFS) or a refused
write (EACCES, EPERM) while writing an output becomes one `UserError` line
naming the path (`write_errors`); outputs are written into a temporary folder
beside their target and swapped in whole (`fresh_tmp`, `swap_in`), so a
reader sees the old output or the new, never a mix. `digests` records what
each file of an output holds, so a reader can refuse a folder whose files
come from different writes (`check_digests`).
"""

import collections
import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import stat
from typing import Callable, Iterator

from mardjax.errors import UserError

# Why a path was not read: the keys of the skip counts.
FIFO = 'fifo'
DEVICE = 'device_file'
SOCKET = 'socket'
NOT_REGULAR = 'not_a_regular_file'
LINK_LOOP = 'symlink_loop'
DANGLING_LINK = 'dangling_symlink'
OUTSIDE_LINK = 'link_outside_folder'
TOO_LARGE = 'too_large'
UNREADABLE = 'unreadable'

# Errors that mean the disk, not the code, refused a write.
DISK_ERRNOS = {errno.ENOSPC: 'no space left on the device',
               errno.EDQUOT: 'disk quota exceeded',
               errno.EFBIG: 'file too large for the file system',
               errno.EROFS: 'read-only file system',
               errno.EACCES: 'permission denied',
               errno.EPERM: 'operation not permitted'}

_MB = 1 << 20
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a reader of a folder accepts.

  Attributes:
    follow_outside_links: follow symlinks whose target resolves outside the
      folder they were found in.
    max_bytes: the largest document read (None: no cap); a line of the
      metadata or reviews file longer than this is skipped.
  """
  follow_outside_links: bool = False
  max_bytes: int | None = None

  @classmethod
  def from_config(cls, section) -> 'Policy':
    """From a config section's `follow_outside_links` and
    `max_document_mb` (0: no cap)."""
    return cls(bool(section.get('follow_outside_links', False)),
               max_bytes(section.get('max_document_mb', 0)))


class Skip(Exception):
  """A path that is not read; `reason` is one of the reasons above."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason


def _kind(mode: int) -> str:
  if stat.S_ISFIFO(mode):
    return FIFO
  if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
    return DEVICE
  if stat.S_ISSOCK(mode):
    return SOCKET
  return NOT_REGULAR


def _inside(path: str, root: str) -> bool:
  real = os.path.realpath(path)
  top = os.path.realpath(root)
  return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def check(path: str, root: str | None = None,
          follow_outside_links: bool = False) -> os.stat_result:
  """The `stat` of `path` when it is a regular file that may be read.

  Nothing is opened: a FIFO is found here, not by blocking on it.

  Args:
    path: the file.
    root: the folder the file was found in; a symlink whose target resolves
      outside it is not followed unless `follow_outside_links`. None: no
      containment check.
    follow_outside_links: follow links that leave `root`.

  Raises:
    Skip: with the reason it is not read.
  """
  try:
    lst = os.lstat(path)
  except OSError as e:
    raise Skip(UNREADABLE, e.strerror or str(e)) from None
  if stat.S_ISLNK(lst.st_mode):
    try:
      st = os.stat(path)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise Skip(LINK_LOOP) from None
      if e.errno == errno.ENOENT:
        raise Skip(DANGLING_LINK) from None
      raise Skip(UNREADABLE, e.strerror or str(e)) from None
  else:
    st = lst
  if not stat.S_ISREG(st.st_mode):  # Even where links may leave the folder.
    raise Skip(_kind(st.st_mode))
  if st is not lst and root is not None and not follow_outside_links and (
      not _inside(path, root)):
    raise Skip(OUTSIDE_LINK, os.path.realpath(path))
  return st


def read_bytes(path: str, max_bytes: int | None = None,
               root: str | None = None,
               follow_outside_links: bool = False) -> bytes:
  """A regular file's bytes, at most `max_bytes` of them.

  Raises:
    Skip: not a regular file (`check`), or larger than `max_bytes`.
  """
  check(path, root, follow_outside_links)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except OSError as e:
    raise Skip(LINK_LOOP if e.errno == errno.ELOOP else UNREADABLE,
               e.strerror or str(e)) from None
  with os.fdopen(fd, 'rb') as f:
    st = os.fstat(fd)
    # The path may have been swapped for something else since `check`.
    if not stat.S_ISREG(st.st_mode):
      raise Skip(_kind(st.st_mode))
    if max_bytes is not None and st.st_size > max_bytes:
      raise Skip(TOO_LARGE, f'{st.st_size / _MB:.1f} MB')
    limit = -1 if max_bytes is None else max_bytes + 1
    try:
      data = f.read(limit)
    except OSError as e:
      raise Skip(UNREADABLE, e.strerror or str(e)) from None
  if max_bytes is not None and len(data) > max_bytes:  # It grew.
    raise Skip(TOO_LARGE, f'over {max_bytes / _MB:.1f} MB')
  return data


def open_regular(path: str, root: str | None = None,
                 follow_outside_links: bool = False, what: str = 'input'):
  """A binary file object over a required input file (the metadata or the
  reviews), which must be a regular file.

  Raises:
    UserError: one line saying why it is not read.
  """
  try:
    check(path, root, follow_outside_links)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except Skip as e:
    hint = (' (config.data.follow_outside_links=True reads it)'
            if e.reason == OUTSIDE_LINK else '')
    raise UserError(f'{path} is not read: {e}{hint}; the {what} must be a '
                    'regular file.') from None
  except OSError as e:
    raise UserError(f'{path} cannot be opened ({e.strerror}).') from None
  f = os.fdopen(fd, 'rb')
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    f.close()
    raise UserError(f'{path} is not a regular file; the {what} must be one.')
  os.set_blocking(fd, True)
  return f


def walk(root: str, suffixes: tuple[str, ...] | None,
         counts: collections.Counter, follow_outside_links: bool = False,
         max_bytes: int | None = None,
         on_skip: Callable[[str, str], None] | None = None
         ) -> Iterator[tuple[str, os.stat_result]]:
  """Yields (path, stat) of the regular files under `root` whose names end
  in one of `suffixes` (lower-cased; None: every file), sorted.

  Others with a wanted suffix are counted in `counts[reason]`: FIFOs,
  devices, sockets, link loops, dangling links, links leaving `root`, files
  over `max_bytes`; `on_skip(path, reason)` hears of each. Linked
  directories are not descended into (a loop of them would never end).
  Files with other suffixes are neither yielded nor counted.
  """
  for dirpath, subdirs, names in os.walk(root):
    subdirs.sort()
    for name in sorted(names):
      if suffixes is not None and not name.lower().endswith(suffixes):
        continue
      path = os.path.join(dirpath, name)
      try:
        st = check(path, root, follow_outside_links)
      except Skip as e:
        reason = e.reason
      else:
        if max_bytes is None or st.st_size <= max_bytes:
          yield path, st
          continue
        reason = TOO_LARGE
      counts[reason] += 1
      if on_skip is not None:
        on_skip(path, reason)


def max_bytes(megabytes: float) -> int | None:
  """A size cap in bytes from a config value in MB (0: no cap)."""
  return int(megabytes * _MB) if megabytes and megabytes > 0 else None


# --- Writing ----------------------------------------------------------------


def check_writable_dirs(paths: list[str]) -> None:
  """Fails with one line naming the path when one of `paths` is a file, or
  cannot be created or written: before any work, not at the first save."""
  for path in paths:
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'{path} is a file, and a directory is needed there: '
                      'move it away or choose another place (--workdir, '
                      '--output_dir).')
    existing = path
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise UserError(f'{existing} is a file, so {path} cannot be created.')
    try:  # A real write: permissions, read-only disks, even as root.
      probe = os.path.join(existing, f'.mardjax-write-probe-{os.getpid()}')
      with open(probe, 'w'):
        pass
      os.remove(probe)
    except OSError as e:
      raise UserError(f'{existing} is not writable ({e.strerror}): '
                      f'{path} is needed for this run.') from None


def disk_error(e: BaseException, path: str) -> UserError | None:
  """The one-line error for a write the disk refused, else None."""
  if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
    where = e.filename or path
    return UserError(f'Cannot write {where}: {DISK_ERRNOS[e.errno]} '
                     f'({errno.errorcode[e.errno]}); nothing of {path} was '
                     'kept. Free space or choose another place, then run '
                     'again.')
  return None


@contextlib.contextmanager
def write_errors(path: str, tmp: str | None = None):
  """Turns a disk's refusal to write into one `UserError` line naming
  `path`; removes the half-written `tmp` folder on any error (an interrupt
  leaves it hidden, for the next run's `fresh_tmp` to clear)."""
  try:
    yield
  except Exception as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    error = disk_error(e, path)
    if error is not None:
      raise error from None
    raise


def fresh_tmp(out_dir: str) -> str:
  """A new temporary folder beside `out_dir`, after clearing what
  interrupted runs left there (`.<name>.tmp-*`, `.<name>.old-*`)."""
  parent = os.path.dirname(os.path.abspath(out_dir)) or '.'
  base = os.path.basename(os.path.abspath(out_dir))
  with write_errors(out_dir):
    os.makedirs(parent, exist_ok=True)
    for leftover in os.listdir(parent):
      if leftover.startswith((f'.{base}.tmp-', f'.{base}.old-')):
        _remove(os.path.join(parent, leftover))
    tmp = os.path.join(parent, f'.{base}.tmp-{os.getpid()}')
    os.makedirs(tmp)
  return tmp


def swap_in(tmp: str, out_dir: str) -> None:
  """Replaces `out_dir` by the finished `tmp`: readers see the old folder or
  the new, never half of one."""
  parent = os.path.dirname(os.path.abspath(out_dir)) or '.'
  base = os.path.basename(os.path.abspath(out_dir))
  old = os.path.join(parent, f'.{base}.old-{os.getpid()}')
  with write_errors(out_dir, tmp):
    if os.path.lexists(out_dir):
      os.rename(out_dir, old)
    os.rename(tmp, out_dir)
  _remove(old)


@contextlib.contextmanager
def whole_folder(out_dir: str) -> Iterator[str]:
  """Yields a fresh temporary folder to write `out_dir`'s new content into;
  swaps it in when the block ends, or, when the disk refuses a write, removes
  it and raises one `UserError` line (`write_errors`)."""
  tmp = fresh_tmp(out_dir)
  with write_errors(out_dir, tmp):
    yield tmp
  swap_in(tmp, out_dir)


def _remove(path: str) -> None:
  """Removes a folder, or the link that stood for one."""
  if os.path.islink(path):
    os.remove(path)
  else:
    shutil.rmtree(path, ignore_errors=True)


def file_digest(path: str) -> dict[str, int | str]:
  """{'size', 'sha256'} of one file."""
  h = hashlib.sha256()
  size = 0
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(CHUNK), b''):
      h.update(block)
      size += len(block)
  return {'size': size, 'sha256': h.hexdigest()}


def digests(directory: str, names: list[str]) -> dict[str, dict]:
  """{name: {'size', 'sha256'}} of files in `directory`."""
  return {n: file_digest(os.path.join(directory, n)) for n in sorted(names)}


def check_digests(directory: str, recorded: dict[str, dict], what: str,
                  again: str, hashes: bool = True,
                  optional: Callable[[str], bool] = lambda name: False
                  ) -> None:
  """Refuses a folder whose files are not the ones its description lists:
  missing (unless `optional(name)`), another size, or (with `hashes`) other
  bytes, as when files of two writes were mixed.

  Raises:
    UserError: one line naming the first file that differs.
  """
  for name, want in sorted(recorded.items()):
    path = os.path.join(directory, name)
    try:
      size = os.stat(path).st_size
    except OSError:
      if optional(name):
        continue
      raise UserError(f'{path} is missing: {what} is incomplete; '
                      f'{again}.') from None
    if size != want['size'] or (hashes and 'sha256' in want and
                                file_digest(path)['sha256'] != want['sha256']):
      raise UserError(f'{path} is not the file {what} was written with (its '
                      'files come from different writes); '
                      f'{again}.')
