"""Rank 0's progress display: a bar when the user's terminal is behind mpiexec, plain lines into pipes
and files (tested in a pseudo-terminal under the real launcher)."""

import os
import pty
import select
import sys
import time

from mpi_util import REPO, clean_env, mpiexec, run_train

from cnnpar.progress import resolve_mode

STEPS = "1200"  # three statistics windows of 512 steps: the bar moves at each


def _in_pty(argv: list, timeout_s: float = 300) -> tuple:
    """Run argv with a pseudo-terminal as its stdin, stdout and stderr; returns (exit status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else
        os.chdir(REPO)
        os.execvpe(argv[0], argv, clean_env())  # not the C environment an Open MPI singleton changed
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _train_argv(log) -> list:
    return [mpiexec(), "-n", "2", sys.executable, "-m", "cnnpar.train", "--steps", STEPS, "--log", str(log)]


def test_a_bar_under_mpiexec_in_a_terminal(tmp_path):
    code, output = _in_pty(_train_argv(tmp_path / "bar.h5"))
    assert code == 0, output[-3000:]
    assert f"{STEPS}/{STEPS}" in output
    bar_lines = [part for part in output.split("\r") if "step/s" in part or "it/s" in part or "%|" in part]
    assert len(bar_lines) >= 2, output[-3000:]      # redrawn in place, not a line every few seconds
    assert f"step {STEPS}/{STEPS} |" not in output  # the plain-lines form


def test_lines_when_the_user_pipes_stderr_even_in_a_terminal(tmp_path):
    command = " ".join(_train_argv(tmp_path / "pipe.h5")) + " 2>&1 | cat"
    code, output = _in_pty(["/bin/sh", "-c", command])
    assert code == 0, output[-3000:]
    assert f"step {STEPS}/{STEPS} |" in output
    assert "%|" not in output


def test_lines_into_pipes_and_the_modes_that_override_auto(tmp_path):
    result = run_train(2, "--steps", STEPS, "--log", str(tmp_path / "a.h5"))
    assert result.returncode == 0, result.stderr
    assert f"step {STEPS}/{STEPS} |" in result.stderr and "\r" not in result.stderr
    result = run_train(1, "--steps", STEPS, "--log", str(tmp_path / "b.h5"), "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert "step " not in result.stderr and "test accuracy" in result.stdout
    result = run_train(1, "--steps", STEPS, "--log", str(tmp_path / "c.h5"), "--progress", "bar")
    assert result.returncode == 0, result.stderr
    assert "%|" in result.stderr


def test_resolve_mode_outside_a_terminal():
    with open(os.devnull, "w") as sink:
        assert resolve_mode("auto", sink) == ("lines", None)
        assert resolve_mode("bar", sink) == ("bar", 80)
        assert resolve_mode("none", sink) == ("none", None)
    reader, writer = os.pipe()
    with os.fdopen(writer, "w") as pipe_end:  # our own pipe: its reader is us, not a parent forwarding it
        assert resolve_mode("auto", pipe_end)[0] == "lines"
    os.close(reader)


def test_progress_flag_is_validated(tmp_path):
    result = run_train(1, "--progress", "sometimes", "--log", str(tmp_path / "x.h5"))
    assert result.returncode == 2
    assert "--progress" in result.stderr and "Traceback" not in result.stderr


def test_the_compile_notice_counts_kernels_in_place_on_a_terminal_and_in_lines_elsewhere(capsys):
    from cnnpar.progress import CompileNotice

    live = CompileNotice(3, 7.6, live=True)
    live.task_done()
    live.task_done()
    live.task_done()
    live.close(7.9)
    text = capsys.readouterr().err
    assert text.startswith("\rcompiling numba kernels for this machine (first run only, about 8 s): 0/3 kernels")
    assert "\r" in text and ": 2/3 kernels" in text and text.endswith("3/3 kernels, done in 7.9 s\n")
    assert text.count("\n") == 1  # one line, redrawn
    plain = CompileNotice(3, 7.6, live=False)
    plain.task_done()
    plain.close(2.0)
    text = capsys.readouterr().err
    assert "\r" not in text
    assert text.splitlines() == ["compiling numba kernels for this machine (first run only, about 8 s)",
                                 "compiled 1/3 kernels in 2.0 s"]
