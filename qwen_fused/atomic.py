"""Atomic writes: the one home for writing a file or folder so that a crash or an error never leaves half of it.

Everything this package writes for the user (LoRA files, checkpoints, images, training state, caches, benchmark
results) goes through here: a temporary beside the target, then one rename.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_output(path, overwrite=False, folder=False):
    """Yield a temporary file (or folder) beside `path` to write; on success it takes `path`'s place.

    Refuses an existing `path` unless `overwrite`, and never replaces a folder by a file or a file by a folder
    (`--output somedir` for a single-file conversion must not delete the folder). On error the temporary
    is removed and `path` is untouched.
    """
    path = os.fspath(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        if os.path.isdir(path) != folder:
            raise FileExistsError(f"{path} is a {'folder' if os.path.isdir(path) else 'file'} but the output is a "
                                  f"{'folder' if folder else 'file'}; not replacing one by the other")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if folder:
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.splitext(path)[1])
            os.close(fd)
    except OSError as e:  # name the output and its folder, not the temporary the user never asked for
        why = "does not exist" if not os.path.isdir(parent) else f"cannot be written to ({e.strerror})"
        raise type(e)(f"cannot write {path}: folder {parent} {why}") from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)  # mkstemp/mkdtemp make them private
        if os.path.isdir(path):  # os.replace cannot replace a non-empty folder: move it aside first
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(path, os.path.join(old, "x"))
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(os.path.join(old, "x"), path)
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise
