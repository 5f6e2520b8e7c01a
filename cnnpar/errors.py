"""User errors: one line naming the culprit, exit status 2, never a traceback.

A `UserError` is raised anywhere input is judged (files, flags, environment).
Entry points wrap their body in `exit_on_user_error`, which prints
`cnnpar: error: <culprit>: <message>` on stderr and exits 2. Bugs are not
UserErrors: they keep their traceback (and, under MPI, abort the job).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


class UserError(Exception):
    """A mistake in what the user gave us; `culprit` is the path, flag or variable at fault."""

    def __init__(self, culprit: str, message: str):
        super().__init__(f"{culprit}: {message}")
        self.culprit = str(culprit)
        self.message = message

    def line(self) -> str:
        return f"cnnpar: error: {self.culprit}: {self.message}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one `cnnpar: error: command line: ...` line, exit 2 under
    exit_on_user_error) instead of argparse's usage screen, and which never takes `--ep` for `--epochs`."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        raise UserError("command line", message)


def print_user_error(err: UserError, file=None) -> None:
    print(err.line(), file=file or sys.stderr, flush=True)


def exit_on_user_error(main):
    """Decorate a CLI `main`: a UserError becomes one line on stderr and exit 2; Ctrl-C exits 130; a closed
    output pipe exits 141 quietly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print_user_error(err)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("cnnpar: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except BrokenPipeError:
            # the reader of our output went away (`| head`): stop as a Unix tool does on SIGPIPE, without
            # a traceback, and keep Python's exit-time flush of stdout from raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(EXIT_BROKEN_PIPE) from None

    return wrapper


EXIT_WRITE_ERROR = 1


class WriteError(UserError):
    """A write to the run log or a checkpoint failed (disk full, quota, I/O error): the environment's
    fault, not a bug, so one line and exit 1. `culprit` is the flag that named the file."""

    exit_status = EXIT_WRITE_ERROR
