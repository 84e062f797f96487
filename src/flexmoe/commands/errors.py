"""Which exceptions are a user's mistake, and the one line that tells them what to do.

`cli.main` (and `flexmoe train`, which runs inside Hydra) turn these into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback. `--debug` (or FLEXMOE_DEBUG=1) keeps
the traceback for user errors too.
"""

from __future__ import annotations

import errno
import json
import os

EXIT_USER_ERROR = 2

# What to do about an OSError, by errno; the message names the path.
_OS_FIXES = {
    errno.ENOENT: "no such file or directory; check the path",
    errno.EEXIST: "already exists; choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "is a directory where a file is expected; give a file",
    errno.EACCES: "permission denied; choose a path you may write (or read), or fix its permissions",
    errno.EPERM: "operation not permitted; choose another path or fix its permissions",
    errno.ENOSPC: "no space left on the device; free space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free space or write to another disk",
    errno.EROFS: "read-only file system; write to another location",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.ENOTEMPTY: "directory not empty; choose another path or empty it",
    errno.EXDEV: "crosses file systems; keep input and output on one disk",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer inputs",
}


def debug_enabled() -> bool:
    """True under `flexmoe --debug` or FLEXMOE_DEBUG=1: user errors keep their traceback."""
    return os.environ.get("FLEXMOE_DEBUG", "") not in ("", "0")


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, KeyError, OSError, json.JSONDecodeError, FloatingPointError]
    try:  # only when safetensors is installed (it always is with torch here)
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def user_error_message(e: BaseException) -> str | None:
    """One line for an expected error class (None: not a user error, i.e. a bug)."""
    if not isinstance(e, _user_error_types()):
        return None
    if isinstance(e, OSError) and e.errno is not None and (e.filename is not None or e.errno in _OS_FIXES):
        where = e.filename if e.filename is not None else ""
        if e.filename2 is not None:
            where = f"{e.filename} -> {e.filename2}"
        fix = _OS_FIXES.get(e.errno) or f"{e.strerror or os.strerror(e.errno)}; check the path and its permissions"
        return f"{where}: {fix}" if where != "" else fix
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else "?"
        return f"missing key {key!r} in an input record; the file was written by another version or edited"
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if type(e).__name__ == "SafetensorError":
        return f"not a readable safetensors file ({first}); re-create or re-download it"
    return first
