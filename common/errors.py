"""User-facing errors: one line that names the problem and the fix, no traceback."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

# A caller that runs a script as a program (common.bench) names a file here to get what the script's main()
# returned, as JSON.
RESULTS_ENV = "COMPRESS_BERT_RESULTS_JSON"


class UserError(Exception):
    """Bad input from the user (flags, files, folders). Printed as one line; the process exits with code 2."""


def file_error(path: str, line: int | None, reason: str, fix: str | None = None) -> UserError:
    """A UserError that names the file (and line, 1-based as an editor counts) and says how to fix it."""
    where = f"{path}:{line}" if line is not None else str(path)
    message = f"{where}: {reason}"
    if fix:
        message += f" ({fix})"
    return UserError(message)


# A file system that refuses a write is the user's to fix (space, permissions, a read-only mount), not a bug.
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's main(); a UserError (or a write the file system refused) becomes one line on stderr and
    exit code 2. When the environment variable COMPRESS_BERT_RESULTS_JSON names a file, what main() returned
    is written there as JSON (by rank 0 alone under torchrun)."""
    from common.io import write_json_atomic  # here: common.io raises this module's errors

    try:
        result = main(argv)
    except UserError as err:
        return _fail(str(err))
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        return _fail(f"cannot write {err.filename or 'a file'}: {err.strerror}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    target = os.environ.get(RESULTS_ENV)
    if target and os.environ.get("RANK", "0") == "0":
        write_json_atomic(target, result)
    return 0


def exit_with(code: int) -> NoReturn:
    """End a script's process with `code` (its `__main__`: `exit_with(run_cli(main))`). A torchrun worker of a
    run of several processes skips the interpreter's finalization: gloo's worker threads may still be releasing
    the tensors of the last collective, which takes the GIL, and a thread that asks for it while the interpreter
    finalizes aborts the whole process (SIGABRT, "terminate called without an active exception", seen in about one
    2-process run in 15 of the SQuAD script, torch 2.13; a core dump shows ProcessGroupGloo::AsyncWork's destructor
    in gil_scoped_acquire on a gloo thread while Py_FinalizeEx runs). By then every output is written and closed
    (script_context has torn the run down); logging and the standard streams are flushed first."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _fail(message: str) -> int:
    logging.getLogger(__name__).debug("user error", exc_info=True)
    print(f"error: {message}", file=sys.stderr)
    return 2
