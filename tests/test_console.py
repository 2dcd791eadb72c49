"""Issue 19: `malt-ops run` keeps the libraries' output in a log file and shows a person its
own lines; `-v` leaves everything on the console. Run in a child process: the redirection is
of the process's descriptors 1 and 2, which pytest's capture would stand in for."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from malt_ops.console import progress_stream, quiet, say

    logging.basicConfig()  # a handler made before, holding sys.stderr, as libraries' are
    with quiet(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
        print("airflow says a lot")
        os.write(2, b"C code writes to fd 2\\n")
        logging.getLogger("transformers").warning("transformers warns")
        say("  sample shard 0 done in 3.0 s")
        progress_stream().write("progress\\n")
    print("after")
    """
)


def _run(tmp_path, verbose: bool) -> subprocess.CompletedProcess:
    log = tmp_path / "logs" / "run.log"
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        check=True,
    )


def test_quiet_sends_library_output_to_the_log_and_keeps_our_lines(tmp_path):
    done = _run(tmp_path, verbose=False)
    assert done.stdout == "  sample shard 0 done in 3.0 s\nprogress\nafter\n"
    assert done.stderr == ""
    kept = (tmp_path / "logs" / "run.log").read_text()
    for line in ("airflow says a lot", "C code writes to fd 2", "transformers warns"):
        assert line in kept
    assert "sample shard 0 done" in kept  # the log file tells the whole story
    assert "after" not in kept


def test_verbose_changes_nothing(tmp_path):
    done = _run(tmp_path, verbose=True)
    assert "airflow says a lot" in done.stdout and "transformers warns" in done.stderr
    assert not (tmp_path / "logs" / "run.log").exists()
