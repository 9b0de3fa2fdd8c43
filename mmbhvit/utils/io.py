# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
"""Atomic file writes: a file the project writes is either the complete new
file or the previous one, never a partial mix.

The new content goes to a temporary file in the destination's folder (same
file system), is flushed and fsync'ed, then renamed over the destination
(``os.replace`` is atomic on POSIX and Windows) and the folder entry is
fsync'ed. Any error (a full disk, a quota, an interrupted pickler) removes
the temporary file and leaves the destination as it was; a full disk is
reported as such, naming the file.
"""
import contextlib
import errno
import os
import os.path as osp
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

__all__ = [
    'atomic_write', 'atomic_torch_save', 'atomic_write_json', 'DiskFullError',
    'sha256_file', 'write_image'
]


class DiskFullError(OSError):
    """No space (or quota) left while writing a file; the previous file at
    that path, if any, is untouched."""


_NO_SPACE = {errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)}


#: Free space (bytes) below which a failed write is blamed on a full disk.
FULL_DISK_MARGIN = 1 << 20


def _is_no_space(exc: BaseException, folder: str) -> bool:
    """Whether a failed write ran out of space: an ENOSPC/EDQUOT OSError in
    the exception chain, or, when a library hid it (torch's zip writer
    reports ``unexpected pos ...``), a folder with (almost) no space left."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_MARGIN
    except OSError:
        return False


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb',
                 sync: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced
    only when the block ends without an error.

    ``sync=False`` skips the fsync calls: still never a partial file after
    an error or a killed process, but not durable across a power loss
    (for the many small files of a dataset conversion).

    Raises:
        DiskFullError: the disk (or quota) filled up; ``path`` unchanged.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f'atomic_write writes whole files: mode "w" or '
                         f'"wb", got {mode!r}')
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if osp.exists(path):  # keep the permissions of the file replaced
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        if sync:
            _fsync_dir(folder)
    except BaseException as exc:
        # judged before the temporary file's space is freed
        no_space = isinstance(exc, Exception) and _is_no_space(exc, folder)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if no_space:
            raise DiskFullError(
                errno.ENOSPC, f'no space left on the device while writing '
                f'{path}; nothing was written (any previous file there is '
                'unchanged)', path) from exc
        raise


def atomic_torch_save(obj: Any, path: str,
                      save: Callable[[Any, IO[bytes]], None] = None) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    import torch
    with atomic_write(path, 'wb') as f:
        (save or torch.save)(obj, f)


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks), as
    ``sha256sum`` prints it."""
    import hashlib
    h = hashlib.sha256()
    with open(os.fspath(path), 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(obj: Any, path: str, **kwargs) -> None:
    """``json.dump(obj, file, **kwargs)`` through :func:`atomic_write`."""
    import json
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, **kwargs)


def write_image(path: str, image, params=None, sync: bool = False) -> None:
    """Write ``image`` (an array as ``cv2.imwrite`` takes it: BGR, or one
    channel) atomically; the format follows the extension.

    ``cv2.imwrite`` returns False instead of raising when it cannot write:
    here any failure raises, naming the file. ``sync``: see
    :func:`atomic_write` (off by default: dataset files are many).
    """
    import cv2
    ext = osp.splitext(path)[1]
    if not ext:
        raise ValueError(f'{path}: no file extension to choose the image '
                         'format by')
    try:
        ok, buf = cv2.imencode(ext, image, list(params or []))
    except cv2.error as exc:
        ok, why = False, str(exc).strip().splitlines()[-1]
    else:
        why = 'the encoder refused it'
    if not ok:
        raise ValueError(f'cannot encode an image of shape '
                         f'{getattr(image, "shape", None)} and dtype '
                         f'{getattr(image, "dtype", None)} as {ext} for '
                         f'{path}: {why}')
    with atomic_write(path, 'wb', sync=sync) as f:
        f.write(buf.tobytes())
