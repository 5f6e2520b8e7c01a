"""Entry points as a new user meets them: every --help works and explains every flag; each mistake is one
`cnnpar:` line naming the culprit with exit status 2, and a legitimate-but-suspicious setting one warning."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from mpi_util import REPO, run_train

SCRIPTS = {  # entry point -> command that runs it
    "cnnpar.train": [sys.executable, "-m", "cnnpar.train"],
    "cnnpar.data": [sys.executable, "-m", "cnnpar.data"],
    "bench_kernels": [sys.executable, str(REPO / "launch" / "bench_kernels.py")],
    "bench_race": [sys.executable, str(REPO / "launch" / "bench_race.py")],
    "bench_scaling": [sys.executable, str(REPO / "launch" / "bench_scaling.py")],
    "table": [sys.executable, str(REPO / "analysis" / "table.py")],
    "plots": [sys.executable, str(REPO / "analysis" / "plots.py")],
    "explain": [sys.executable, str(REPO / "analysis" / "explain.py")],
}


def _run(command, *args, timeout=120):
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _cnnpar_lines(text: str) -> list:
    """cnnpar's own lines (a launcher may add banners of its own after them)."""
    return [line for line in text.splitlines() if line.startswith("cnnpar:")]


def _assert_one_error(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    lines = _cnnpar_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _options_without_help(help_text: str) -> list:
    """Option rows of an argparse help screen whose help column is empty (nothing after the flag, and the
    next row is not its indented continuation)."""
    rows = help_text.splitlines()
    missing = []
    for i, row in enumerate(rows):
        match = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", row)
        if not match or match.group(2) == "--help":
            continue
        rest = match.group(3)
        described = re.search(r"\S\s{2,}\S", match.group(2) + rest) is not None
        following = rows[i + 1] if i + 1 < len(rows) else ""
        continued = re.match(r"^ {10,}\S", following) is not None
        if not (described or continued):
            missing.append(match.group(2))
    return missing


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_entry_point_explains_every_flag(name):
    done = _run(SCRIPTS[name], "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert _options_without_help(done.stdout) == [], done.stdout


def test_the_help_check_notices_a_flag_without_help():
    screen = "options:\n  -h, --help  show this help message and exit\n  --arch ARCH\n  --k K       samples\n"
    assert _options_without_help(screen) == ["--arch"]


def test_eval_every_zero_is_explained():
    done = _run(SCRIPTS["cnnpar.train"], "--help")
    assert re.search(r"0 = only\s+after the last\s+epoch", done.stdout), done.stdout


@pytest.mark.parametrize("where, fragment", [
    ("proc", "cannot be created: No such file or directory"),
    ("file-as-folder", "is a file, not a folder"),
    ("folder", "is a folder; give a file path such as"),
])
def test_bad_log_paths_are_one_line_naming_the_cause(tmp_path, where, fragment):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    path = {"proc": "/proc/cnnpar-test.h5", "file-as-folder": tmp_path / "afile" / "x.h5",
            "folder": f"{tmp_path / 'adir'}{os.sep}"}[where]
    if where == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    done = run_train(1, "--steps", "2", "--log", path, timeout=60)
    line = _assert_one_error(done, "--log", fragment)
    assert "flags =" not in line and "MPI_Abort" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "adir").iterdir()) == []
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("flags, culprit, fragment", [
    (["--warmup-steps", "10"], "--warmup-steps", "needs --lr-scaling linear"),
    (["--allreduce", "factored", "--samples-per-rank", "4"], "--allreduce", "needs --samples-per-rank 1"),
])
def test_settings_that_cannot_work_are_refused_before_any_note(tmp_path, flags, culprit, fragment):
    # 3 ranks on at most 2 cores would print the oversubscription note first if the check came late
    done = run_train(3, "--steps", "2", "--log", tmp_path / "x.h5", *flags, timeout=60)
    _assert_one_error(done, culprit, fragment)
    assert "note:" not in done.stderr, done.stderr
    assert not (tmp_path / "x.h5").exists()


def test_more_pretend_nodes_than_ranks_is_refused(tmp_path):
    done = run_train(2, "--steps", "2", "--pretend-nodes", "3", "--log", tmp_path / "x.h5", timeout=60)
    _assert_one_error(done, "--pretend-nodes", "3 pretend nodes need at least as many ranks")


def test_rma_race_on_one_rank_and_a_blown_up_loss_each_warn_once(tmp_path):
    race = run_train(1, "--steps", "20", "--mode", "race", "--race-window", "rma", "--log", tmp_path / "r.h5",
                     timeout=120)
    assert race.returncode == 0, race.stderr
    assert [line for line in race.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: --race-window rma with one rank: nothing races, the run is plain SGD"]
    blown = run_train(1, "--steps", "300", "--lr", "10000", "--log", tmp_path / "b.h5", timeout=120)
    assert blown.returncode == 0, blown.stderr
    warnings = [line for line in blown.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "did not learn" in warnings[0] and "--lr" in warnings[0], blown.stderr
    calm = run_train(1, "--steps", "300", "--log", tmp_path / "c.h5", timeout=120)
    assert calm.returncode == 0 and "warning:" not in calm.stderr, calm.stderr


def test_resuming_a_checkpoint_with_another_log_names_the_right_log(tmp_path):
    first = tmp_path / "c.h5"
    done = run_train(1, "--steps", "40", "--checkpoint-every", "20", "--log", first, "--quiet", timeout=120)
    assert done.returncode == 0, done.stderr
    checkpoint = f"{first}.ckpt"
    assert os.path.exists(checkpoint)
    done = run_train(1, "--steps", "40", "--checkpoint-every", "20", "--resume", checkpoint,
                     "--log", tmp_path / "d.h5", timeout=60)
    _assert_one_error(done, "--resume", f"continues the log {first}", f"pass --log {first}")
    assert not (tmp_path / "d.h5").exists()


def test_data_check_speaks_of_its_argument_and_prints_no_training_notice(tmp_path):
    done = _run(SCRIPTS["cnnpar.data"], "check", "mnist-5k")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "mnist-5k" in done.stdout
    done = _run(SCRIPTS["cnnpar.data"], "check", tmp_path / "nothing-here")
    line = _assert_one_error(done, "cnnpar: error: dataset: ")
    assert "--dataset" not in line


def test_bench_kernels_without_torch_stops_before_benchmarking():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    done = _run(SCRIPTS["bench_kernels"], "--vs-torch", timeout=60)
    _assert_one_error(done, "--vs-torch", "pip install -e '.[torch]'")
    assert done.stdout == "", "nothing may run before the check"


def test_bench_scaling_never_writes_into_the_committed_results_by_default():
    from cnnpar.bench import scaling as bench
    committed = (REPO / "analysis" / "results").resolve()
    for quick in (False, True):
        out = bench.default_out_dir(quick).resolve()
        assert committed not in (out, *out.parents), out
        assert (REPO / "runs").resolve() in out.parents


def test_analysis_scripts_share_one_rule_for_foreign_files(tmp_path):
    """table, plots and explain all skip a file that is not a run log with a note naming it, and stop with one
    line only when nothing usable is left; explain leaves no --out folder behind when it stops."""
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"certainly not HDF5")
    log = tmp_path / "real.h5"
    assert run_train(1, "--steps", "30", "--log", log, "--quiet", timeout=120).returncode == 0
    table = _run(SCRIPTS["table"], foreign, log)
    assert table.returncode == 0, table.stderr
    assert str(foreign) in table.stderr and "skipping" in table.stderr
    plots = _run(SCRIPTS["plots"], foreign, log, "--out", tmp_path / "figures")
    assert plots.returncode == 0, plots.stderr
    assert str(foreign) in plots.stderr and "skipping" in plots.stderr
    for name in ("table", "plots"):
        alone = _run(SCRIPTS[name], foreign, "--out" if name == "plots" else "--paper",
                     *([tmp_path / "figs2"] if name == "plots" else []))
        _assert_one_error(alone)
    out = tmp_path / "report" / "deeper"
    explain = _run(SCRIPTS["explain"], foreign, "--out", out)
    _assert_one_error(explain)
    assert str(foreign) in explain.stderr
    assert not (tmp_path / "report").exists()


def test_fetch_of_a_page_that_is_not_the_file_is_not_called_transient(tmp_path):
    import http.server
    import threading

    bodies = {"html": b"<!DOCTYPE html><html><body>Moved</body></html>", "junk": os.urandom(4096)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies[self.path.strip("/").split("/")[0]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for kind, fragment in (("html", "an HTML page"), ("junk", "not a gzip file")):
            done = _run(SCRIPTS["cnnpar.data"], "fetch", "mnist", "--dir", tmp_path / kind,
                        "--mirror", f"http://127.0.0.1:{port}/{kind}/", "--timeout", "10")
            line = _assert_one_error(done, fragment)
            assert "try again later" not in line, line
            assert not (tmp_path / kind).exists()
    finally:
        server.shutdown()
        server.server_close()


def test_a_closed_output_pipe_stops_quietly(tmp_path):
    """`launch/map.py ... | head -1` once head has gone: the script stops as a Unix tool does on SIGPIPE
    (status 141) without a traceback. The pipe's read end is closed before the script writes a byte."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    command = [sys.executable, "launch/map.py", "--out", str(tmp_path / "map"), "--dry-run"]
    try:
        done = subprocess.run(command, cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_the_log_path_check_never_creates_the_log_itself(tmp_path, monkeypatch):
    """A watcher polling for the log must never find an empty file at its name (seen as 'not an HDF5 file'
    by launch/soak.py's live reads): the writability probe is a sibling file."""
    from cnnpar import runpaths

    created = []
    real_open = os.open

    def recording_open(name, flags, *args):
        if flags & os.O_CREAT:
            created.append(os.fspath(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(runpaths.os, "open", recording_open)
    log = tmp_path / "run.h5"
    runpaths.check_log_path(str(log), make_folder=False, resuming=False)
    assert created and str(log) not in created, created
    assert sorted(tmp_path.iterdir()) == []  # and the probe is gone


CNNPAR = [sys.executable, "-m", "cnnpar"]  # the `cnnpar` console command, as `python -m cnnpar`


def test_cnnpar_command_lists_every_subcommand_and_each_answers_help():
    from cnnpar.cli import BENCHMARKS, COMMANDS

    listing = _run(CNNPAR, "--help")
    assert listing.returncode == 0, listing.stderr
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s", listing.stdout, re.M), (name, listing.stdout)
    for name in [n for n in COMMANDS if n != "bench"] + [f"bench {b}" for b in BENCHMARKS]:
        done = _run(CNNPAR, *name.split(), "--help", timeout=180)
        assert done.returncode == 0, (name, done.stdout[-1000:], done.stderr[-2000:])
        assert done.stdout.lstrip().startswith("usage:"), (name, done.stdout[:300])


def test_cnnpar_subcommand_runs_the_module_with_its_flags(tmp_path):
    """`cnnpar table` is `analysis/table.py`: the same one-line error for the same mistake, and the sweep's
    dry run prints the same plan either way."""
    _assert_one_error(_run(CNNPAR, "table", tmp_path / "absent.h5"), "absent.h5")
    _assert_one_error(_run(SCRIPTS["table"], tmp_path / "absent.h5"), "absent.h5")
    by_command = _run(CNNPAR, "sweep", "--preset", "smoke", "--out", tmp_path / "s", "--dry-run")
    by_script = _run([sys.executable, str(REPO / "launch" / "sweep.py")], "--preset", "smoke", "--out",
                     tmp_path / "s", "--dry-run")
    assert by_command.returncode == by_script.returncode == 0, by_command.stderr + by_script.stderr
    assert by_command.stdout == by_script.stdout and "smoke" in by_command.stdout


@pytest.mark.parametrize("argv, culprit", [(["nope"], "command"), (["bench", "nope"], "bench")])
def test_cnnpar_unknown_subcommand_is_one_line(argv, culprit):
    line = _assert_one_error(_run(CNNPAR, *argv), argv[-1])
    assert line.startswith(f"cnnpar: error: {culprit}: ")


def _help_text(text: str) -> str:
    """argparse's help with its line wrapping undone (it also breaks lines after a hyphen)."""
    return re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", text))


def test_every_flag_help_gives_the_config_default(tmp_path):
    from dataclasses import fields

    from cnnpar.config import Config, build_parser

    actions = {action.dest: action for action in build_parser()._actions}
    for f in fields(Config):
        action = actions[f.name]
        if f.type in ("bool", bool):  # a switch: off unless given, and its help promises no other default
            assert f.default is False and action.const is True and "(default:" not in action.help, f.name
            continue
        assert action.default == f.default, f.name
        shown = re.fullmatch(r".*\(default: ([^()]*)\)", action.help, re.S)
        assert shown, (f.name, action.help)
        if f.default == "":
            assert shown.group(1) == f.metadata.get("shown_default", "none"), (f.name, action.help)
        else:  # parsed back as the flag would parse it, the shown default is the Config default
            assert action.type(shown.group(1)) == f.default, (f.name, action.help)
    # --log's default is the path a run without --log really writes (the help said 'none')
    screen = _help_text(_run(SCRIPTS["cnnpar.train"], "--help").stdout)
    shown = re.search(r"--log LOG HDF5 run log path \(default: (\S+)\)", screen).group(1)
    assert shown == "runs/<date-time>-n<ranks>-<mode>.h5", shown
    done = subprocess.run([*SCRIPTS["cnnpar.train"], "--dataset", "mnist-5k", "--steps", "5", "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (written,) = (p.relative_to(tmp_path) for p in (tmp_path / "runs").iterdir())
    pattern = re.escape(shown).replace(re.escape("<date-time>"), r"\d{8}-\d{6}").replace(re.escape("<ranks>"), "1")
    assert re.fullmatch(pattern.replace(re.escape("<mode>"), "sync"), str(written)), written


@pytest.mark.parametrize("command, usage", [
    ([sys.executable, "-m", "cnnpar.train"], "python -m cnnpar.train"),
    ([os.path.join(os.path.dirname(sys.executable), "cnnpar-train")], "cnnpar-train"),
    ([os.path.join(os.path.dirname(sys.executable), "cnnpar"), "train"], "cnnpar train"),
    ([os.path.join(os.path.dirname(sys.executable), "cnnpar"), "runlog"], "cnnpar runlog"),
])
def test_usage_names_the_command_as_invoked(command, usage):
    if not os.path.exists(command[0]):
        pytest.skip(f"{command[0]} is not installed beside this Python")
    done = _run(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {usage} "), done.stdout[:200]
    if "train" in usage:
        assert f"Run under MPI: mpirun -n 12 {usage}" in _help_text(done.stdout)


@pytest.mark.parametrize("command, flags, given", [
    (SCRIPTS["cnnpar.train"], ["--epoch", "1"], "--epoch 1"),  # --epochs
    (SCRIPTS["cnnpar.train"], ["--ep", "1"], "--ep 1"),
    (SCRIPTS["cnnpar.train"], ["--log-win", "8"], "--log-win 8"),  # --log-window
    ([sys.executable, "-m", "cnnpar.data", "list"], ["--data", "x"], "--data x"),  # --data-dir
    ([sys.executable, "-m", "cnnpar", "table", "x.h5"], ["--pap"], "--pap"),  # --paper
])
def test_abbreviated_flags_are_refused(tmp_path, command, flags, given):
    done = _run(command, *flags, *(["--log", tmp_path / "x.h5"] if command is SCRIPTS["cnnpar.train"] else []))
    line = _assert_one_error(done)
    assert given in line, line
    assert list(tmp_path.iterdir()) == []


def _parsers_made(path) -> list:
    """(line, whether allow_abbrev=False is given) for every argparse parser the file makes."""
    import ast

    tree = ast.parse(path.read_text())
    made = []
    parser_classes = {"ArgumentParser"} | {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                                           and any(getattr(base, "attr", getattr(base, "id", "")) == "ArgumentParser"
                                                   for base in node.bases)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in parser_classes or name == "add_parser":
                made.append((node.lineno, any(k.arg == "allow_abbrev" and getattr(k.value, "value", None) is False
                                              for k in node.keywords)))
    return made


def test_no_parser_in_the_package_accepts_abbreviations():
    """argparse's prefix matching (--ep for --epochs) would let a typo or a removed flag pass as another."""
    files = [p for folder in ("cnnpar", "launch", "analysis") for p in sorted((REPO / folder).rglob("*.py"))]
    made = {f"{p.relative_to(REPO)}:{line}": refused for p in files for line, refused in _parsers_made(p)}
    assert len(made) > 20  # the scan finds the parsers (the trainer's, the subcommands', the benchmarks')
    assert [where for where, refused in made.items() if not refused] == []
