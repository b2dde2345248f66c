"""What the CLI prints when a command fails: one line naming the problem and the fix, never a traceback.

Errors a user's input can cause (fmtransfer's own `FmtError`s, plus the foreign ones such input raises
deep inside torch, safetensors, json or the OS: a damaged file, a dead torchrun peer, a full disk, no
memory) exit with 2. Anything else is a bug: one line with the path of a log file holding the
traceback, exit 1. `FMTRANSFER_DEBUG=1` shows the traceback instead, whatever the error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

from fmtransfer.errors import FmtError

DEBUG_ENV = "FMTRANSFER_DEBUG"
PEER_HINTS = ("connection closed by peer", "connection reset by peer", "gloo", "nccl", "broken pipe",
              "socket timeout", "timed out")


def one_line(e: BaseException, limit: int = 240) -> str:
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", " ".join(str(e).split()))  # drop C++ source refs
    text = text or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_message(e: BaseException) -> str | None:
    """The one-line message of an error caused by the user's input or environment; None for a bug."""
    if isinstance(e, FmtError):
        return str(e)
    name = type(e).__name__
    if name == "SafetensorError":
        return f"a .safetensors file is damaged ({one_line(e, 160)}); delete it and write it again (rerun the step)"
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is damaged ({e.msg} at line {e.lineno}); delete it and rerun the step that wrote it"
    if name in ("DistBackendError", "DistNetworkError", "DistError") or (
            isinstance(e, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and any(h in str(e).lower() for h in PEER_HINTS)):
        rank = os.environ.get("RANK", "?")
        return (f"rank {rank}: another process of this torchrun job stopped ({one_line(e, 100)}); its own error is "
                "printed above: fix that, then run the same command again with --resume")
    if isinstance(e, MemoryError) or name == "OutOfMemoryError":
        return ("out of memory; lower train.batch_size or train.eval_batch_size (or use a machine with more memory) "
                f"({one_line(e, 80)})")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk ({e.filename or one_line(e, 80)}); free some space, then run again"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or one_line(e, 120)}; choose a folder you can write to"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return f"read-only file system: {e.filename}; choose a folder you can write to"
    return None


def log_traceback(e: BaseException) -> Path:
    """Write the traceback to a fresh log file in the temp folder; return its path."""
    path = Path(tempfile.gettempdir()) / f"fmtransfer-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return path


def report(e: BaseException, prog: str = "fmtransfer") -> int:
    """Print one line for `e` on stderr (the caller writes it) and return the exit code: 2 user, 1 bug."""
    import sys

    msg = user_message(e)
    if msg is not None:
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    try:
        where = f"the traceback is in {log_traceback(e)}"
    except OSError:
        where = f"run with {DEBUG_ENV}=1 to see the traceback"
    print(f"{prog}: internal error: {type(e).__name__}: {one_line(e, 160)} (a bug: please report it; {where})",
          file=sys.stderr, flush=True)
    return 1
