"""One shape for every command line: a parser whose errors are one line, help texts that
show defaults, and a runner that turns user errors into one-line messages and exit codes.

Used by ``trace-rt``, ``python -m export``, ``python -m training`` and
``python -m triton_repo`` (and usable by any other entry point)::

    parser = Parser(prog="python -m export", description="Export a TRACE checkpoint ...")
    ...
    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_command("python -m export", lambda: COMMANDS[args.command](args))

Exit codes: 0 success, 2 a usage or input error (bad flag, missing file, bad request:
every :class:`~trace_rt.errors.TraceError` and the extra *user_errors* a tool names), 1 an
operating-system error (permissions, disk full), 130 Ctrl-C, 141 a closed output pipe
(``| head``); a missing optional package (``tensorrt``) is one line with exit code 1
too. ``TRACE_RT_DEBUG=1`` re-raises instead, for a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable

from trace_rt.errors import TraceError

EXIT_OK = 0
EXIT_ENVIRONMENT = 1  # an OS error or a missing optional package
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cmd | head`
DEBUG_ENV = "TRACE_RT_DEBUG"

_CHOICE = re.compile(
    r"argument (?P<arg>[^:]+): invalid choice: (?P<value>.+?) \(choose from (?P<choices>.*)\)$"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help unless it has none worth showing
    (``None``, ``False``) or the help text already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False  # (0 is a real default)
        if quiet or action.default == argparse.SUPPRESS or "default" in text:
            return text
        if not action.option_strings:  # positionals have no default
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) naming the problem.

    ``invalid choice`` errors read ``unknown task 'dcv'; choose dvc, mr, vhd``. Subparsers
    made from it inherit both this and :class:`HelpFormatter`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line_usage_error(message)}\n")


def one_line_usage_error(message: str) -> str:
    """argparse's *message*; ``invalid choice`` reads ``unknown NAME 'x'; choose a, b``."""
    m = _CHOICE.match(message)
    if m is None:
        return message
    flag = m["arg"].split("/")[-1].strip()
    name = flag.lstrip("-")
    what = name if "-" not in name else f"{flag} value"  # "unknown --on-bad-sample value"
    choices = ", ".join(c.strip().strip("'") for c in m["choices"].split(","))
    return f"unknown {what} {m['value']}; choose {choices}"


def describe_os_error(e: OSError) -> str:
    """``Permission denied: 'x.mp4'`` rather than ``[Errno 13] Permission denied: 'x.mp4'``."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {os.fsdecode(e.filename)}"
    return str(e.strerror or e)


def run_command(
    prog: str,
    body: Callable[[], int | None],
    *,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run *body* and return an exit code; a user error prints one line, not a traceback.

    Args:
        prog: the program name that prefixes messages (``trace-rt: error: ...``).
        body: the command; its return value (``None`` = 0) is the exit code.
        user_errors: exception types, besides :class:`TraceError`, that are the user's
            (a missing data file, a bad recipe): exit code 2 and their message.
    """
    if os.environ.get(DEBUG_ENV):
        return body() or EXIT_OK
    try:
        return body() or EXIT_OK
    except (TraceError, *user_errors) as e:
        return _fail(prog, str(e) or type(e).__name__, EXIT_USAGE)
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more can be printed, and Python would
        # complain again when it flushes stdout at exit, so point stdout at /dev/null.
        with contextlib.suppress(AttributeError, OSError, ValueError):  # stdout replaced
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        missing = isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
        code = EXIT_USAGE if missing else EXIT_ENVIRONMENT
        return _fail(prog, describe_os_error(e), code)
    except ImportError as e:  # an optional package this command needs (tensorrt, ...)
        return _fail(prog, str(e), EXIT_ENVIRONMENT)


def _fail(prog: str, message: str, code: int) -> int:
    first, _, rest = message.partition("\n")
    # Keep multi-line messages (a server's log tail) but lead with the cause.
    print(f"{prog}: error: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)
    return code
