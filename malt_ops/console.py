"""What `malt-ops run` shows a person (issue 19): one line per stage as it starts and ends,
our progress bars, and a summary at the end. Everything else the libraries print (Airflow,
transformers, TRL, vLLM, MLflow) goes to a log file under the run's state directory; `-v`
keeps it all on the console.

The libraries write to the process's stdout and stderr from threads and C code, so the
redirection is of file descriptors 1 and 2, not of ``sys.stdout``: a logging handler or a
print that holds the old stream still lands in the file. The console keeps its own
duplicate of the terminal's descriptor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_console: TextIO | None = None


def log_path(state_dir: str, run_id: str) -> Path:
    return Path(state_dir) / "logs" / f"{run_id}.log"


@contextmanager
def quiet(path: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Send descriptors 1 and 2 to ``path`` (appending) while the block runs; ``say`` still
    reaches the terminal. ``verbose``: change nothing."""
    global _console
    if verbose or _console is not None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _console.close()
        _console = None


def say(text: str) -> None:
    """A line for the person at the terminal (and for the log file when it is redirected)."""
    if _console is not None:
        _console.write(text + "\n")
        _console.flush()
        print(text, flush=True)  # the log file keeps the whole story, console lines too
    else:
        print(text, flush=True)


def progress_stream() -> TextIO:
    """Where our progress bars draw: the terminal, even while the rest goes to the log."""
    return _console if _console is not None else sys.stderr


_skipped = False


def mark_skipped() -> None:
    """The stage now running found its output committed (its console line says so)."""
    global _skipped
    _skipped = True


def take_skipped() -> bool:
    global _skipped
    skipped, _skipped = _skipped, False
    return skipped
