"""Errors in what a user gave (a config, a data file, a run folder, a checkpoint, artifacts, a command
line), and how the command-line tools report them.

Their messages name the file, line or key, the bad value and the fix, in one line. The launchers
print that line and exit with status 2; the traceback is shown only with ``--debug`` or
``RECBLR_DEBUG=1``. Each error is also a ValueError (or FileNotFoundError), so code that catches
those keeps working.
"""

import logging
import os
import sys
from typing import Callable, List, Optional

DEBUG_ENV = "RECBLR_DEBUG"


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it, in one line."""


class ConfigError(UserError, ValueError):
    """A config value (YAML, ``--set`` or a dataclass field) that cannot run."""


class DataError(UserError, ValueError):
    """A data file that cannot be read as what it claims to be, or that filtering empties."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunFolderError(UserError, ValueError):
    """A run folder that holds another run than the one asked for."""


class UnsupportedRunError(UserError, NotImplementedError):
    """A trained run that the asked-for tool does not serve (serving artifacts of a SASRec run, say)."""


def debugging(argv: List[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """``main(argv)``, with a :class:`UserError` printed as one line (``error: ...``) and exit
    status 2 instead of a traceback, unless debugging."""
    # TorchRec's jagged tensors ask torch.fx whether they are being traced, and torch answers with
    # a deprecation notice about that question, not about this code: keep it off the commands' output.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except UserError as error:
        if debugging(argv):
            raise
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2
