"""The HDF5 run log: round trip, crash safety, live reading, resume, and every bad file as a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnpar.errors import UserError
from cnnpar.runlog import (FORMAT, FORMAT_VERSION, RunLogWriter, is_complete_log, open_log)
from mpi_util import run_train

REPO = Path(__file__).resolve().parents[1]
LAYOUT = [("conv1.w", (8, 1, 5, 5), 0, 200), ("conv1.b", (8,), 200, 8), ("dense.w", (10, 8), 208, 80),
          ("temperature", (), 288, 1)]
N_PARAMS = 289


def _config(**over):
    config = {"mode": "race", "lr": 0.01, "seed": 3, "race_audit": True, "folds": 2, "log": "", "quiet": False,
              "epochs": 2, "data_dir": "", "noise_scale": True}
    config.update(over)
    return config


ENV = {"cnnpar": "0.1.0", "python": "3.11.7", "numpy": "2.0", "numba": "0.60", "mpi4py": "4.0",
       "mpi_library": "MPICH Version: 4.2", "hostnames": ["node-a", "node-b", "node-b"], "ranks": 3, "cores": 12,
       "physical_cores": 6, "oversubscribed": False, "threads_per_rank": 1, "nested": {"k": [1, 2]},
       "nothing": None}


def _step_window(rng, start, n, ranks, epoch):
    return dict(step=np.arange(start, start + n), epoch=np.full(n, epoch, np.int32),
                loss=rng.random(n, dtype=np.float32), rank_loss=rng.random((n, ranks), dtype=np.float32),
                samples=np.full(n, ranks, np.int32), compute_s=rng.random((n, ranks), dtype=np.float32),
                exchange_s=rng.random((n, ranks), dtype=np.float32),
                wait_s=rng.random((n, ranks), dtype=np.float32), lr=np.full(n, 0.01, np.float32))


def _write_full_log(path, ranks=3, steps_per_epoch=40, epochs=2, seed=0):
    """A complete log with every group filled; returns what was written, for comparison."""
    rng = np.random.default_rng(seed)
    config = _config()
    written = {"steps": [], "audit": [], "epochs": [], "consistency": [], "noise": [], "noise_epochs": []}
    with RunLogWriter(path, json.dumps(config, sort_keys=True), config, ENV, LAYOUT, ranks) as log:
        for epoch in range(epochs):
            start = epoch * steps_per_epoch
            for lo in range(0, steps_per_epoch, 16):  # windows of 16 steps
                n = min(16, steps_per_epoch - lo)
                window = _step_window(rng, start + lo, n, ranks, epoch)
                window["rank_loss"][0, -1] = np.nan
                log.append_steps(**window)
                written["steps"].append(window)
                audit = dict(step=window["step"], rel_l2_error=rng.random(n),
                             frac_elements_differ=rng.random(n), lost_contributions=rng.random(n) * ranks)
                log.append_audit(**audit)
                written["audit"].append(audit)
                noise = dict(first_step=start + lo, step=start + lo + n - 1, steps=n, b_small=1.0,
                             b_big=float(ranks), g2=rng.random(), trace=rng.random() * 50, b_simple=rng.random())
                log.append_noise(**noise)
                written["noise"].append(noise)
            row = dict(epoch=epoch, step=start + steps_per_epoch, train_loss=1.0 / (epoch + 1),
                       train_acc=0.5 + 0.1 * epoch, test_loss=1.1 / (epoch + 1), test_acc=0.55 + 0.1 * epoch,
                       train_time_s=3.5 * (epoch + 1), samples=ranks * steps_per_epoch * (epoch + 1))
            log.append_epoch(**row)
            written["epochs"].append(row)
            noise_epoch = dict(epoch=epoch, step=start + steps_per_epoch, steps=steps_per_epoch, g2=rng.random(),
                               trace=rng.random() * 50, b_simple=rng.random() * 100)
            log.append_noise_epoch(**noise_epoch)
            written["noise_epochs"].append(noise_epoch)
            log.append_consistency(start + steps_per_epoch - 1, 0xFFFFFFFF - epoch, True)
            written["consistency"].append((start + steps_per_epoch - 1, 0xFFFFFFFF - epoch, True))
            log.flush()
        params = rng.standard_normal(N_PARAMS).astype(np.float32)
        confusion = rng.integers(0, 50, (10, 10))
        log.write_folds([0.9, 0.8], [0.3, 0.4])
        log.write_final(params, confusion, test_acc=0.65, test_loss=0.55, train_time_s=7.0, samples=240,
                        samples_per_s=240 / 7.0, steps=80, note="extra")
        log.close("complete")
    written.update(params=params, confusion=confusion, config=config)
    return written


def test_every_field_round_trips(tmp_path):
    path = tmp_path / "run.h5"
    w = _write_full_log(path)
    with open_log(path) as log:
        assert log.path == str(path) and log.format_version == FORMAT_VERSION
        assert log.status == "complete" and log.complete and log.status_message == ""
        assert log.ranks == 3 and log.n_classes == 10 and log.resume_count == 0
        assert log.created.endswith("Z") and "T" in log.created
        assert log.config == w["config"] and log.config_json == json.dumps(w["config"], sort_keys=True)
        assert log.env == {k: v for k, v in ENV.items()}  # None and nested values survive via JSON
        assert log.layout == LAYOUT
        for key in w["steps"][0]:
            np.testing.assert_array_equal(log.steps[key], np.concatenate([s[key] for s in w["steps"]]), key)
        assert log.steps["rank_loss"].shape == (80, 3) and np.isnan(log.steps["rank_loss"][0, -1])
        assert log.steps["step"].dtype == np.int64 and log.steps["epoch"].dtype == np.int32
        assert log.steps["loss"].dtype == np.float32 and log.steps["samples"].dtype == np.int32
        for key in w["audit"][0]:
            np.testing.assert_array_equal(log.audit[key], np.concatenate([a[key] for a in w["audit"]]), key)
        for key in w["epochs"][0]:
            np.testing.assert_array_equal(log.epochs[key], [row[key] for row in w["epochs"]], key)
        assert log.epochs["samples"].dtype == np.int64 and log.epochs["test_acc"].dtype == np.float64
        assert [tuple(r) for r in zip(*(log.consistency[k].tolist() for k in ("step", "checksum", "ok")))] == \
            w["consistency"]
        assert log.consistency["checksum"].dtype == np.uint64
        np.testing.assert_array_equal(log.folds["test_acc"], [0.9, 0.8])
        np.testing.assert_array_equal(log.folds["fold"], [0, 1])
        assert log.folds["mean_acc"] == pytest.approx(0.85) and log.folds["sd_acc"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
        np.testing.assert_array_equal(log.final["params"], w["params"])
        np.testing.assert_array_equal(log.final["confusion"], w["confusion"])
        assert log.final["attrs"] == {"test_acc": 0.65, "test_loss": 0.55, "train_time_s": 7.0, "samples": 240,
                                      "samples_per_s": 240 / 7.0, "steps": 80, "note": "extra"}
        views = log.param_views()
        assert views["conv1.w"].shape == (8, 1, 5, 5) and views["temperature"].shape == ()
        np.testing.assert_array_equal(views["dense.w"].ravel(), w["params"][208:288])
    assert is_complete_log(path)
    # h5ls-friendly copies of the config and env, and the root attributes, as plain HDF5
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == FORMAT.encode() and f.attrs["format_version"] == FORMAT_VERSION
        assert f["config"].attrs["lr"] == 0.01 and f["config"].attrs["mode"] == b"race"
        assert bool(f["config"].attrs["race_audit"]) is True
        assert list(f["env"].attrs["hostnames"]) == [b"node-a", b"node-b", b"node-b"]
        assert "nothing" not in f["env"].attrs
        assert list(f["layout/shapes"]) == [b"8x1x5x5", b"8", b"10x8", b""]
        assert f["steps/compute_s"].maxshape == (None, 3) and f["steps/compute_s"].chunks is not None


def test_optional_groups_lr_and_scalars(tmp_path):
    path = tmp_path / "sync.h5"
    config = _config(mode="sync", race_audit=False, folds=1)
    with RunLogWriter(path, json.dumps(config), config, {}, [], 1, n_classes=3) as log:
        log.append_steps(0, 0, 2.3, [[2.3]], 1, [[0.01]], [[0.0]], [[0.0]])  # one row of scalars, no lr
        with pytest.raises(RuntimeError, match="audit"):
            log.append_audit([0], [0.0], [0.0], [0.0])
        with pytest.raises(RuntimeError, match="folds"):
            log.write_folds([0.5], [1.0])
        with pytest.raises(ValueError, match=r"\(n, 1\)"):
            log.append_steps([1, 2], [0, 0], [1, 1], [[1, 1]], [1, 1], [[1], [1]], [[1], [1]], [[1], [1]])
        assert log.rows("steps") == 1 and log.rows("audit") == 0 and log.rows("final") == 0
    with open_log(path) as log:
        assert log.audit is None and log.folds is None and log.final is None
        assert log.status == "interrupted"  # closed without saying how the run ended
        assert np.isnan(log.steps["lr"]).all() and log.steps["loss"].tolist() == [pytest.approx(2.3)]
        with pytest.raises(ValueError):
            log.param_views()


def test_exception_inside_the_writer_marks_the_log_failed(tmp_path):
    path = tmp_path / "failed.h5"
    with pytest.raises(ZeroDivisionError):
        with RunLogWriter(path, "{}", {}, {}, [], 2) as log:
            log.append_epoch(0, 10, 1.0, 0.5, 1.0, 0.5, 1.0, 20)
            1 / 0
    with open_log(path) as log:
        assert log.status == "failed" and log.status_message == "ZeroDivisionError: division by zero"
        assert list(log.epochs["epoch"]) == [0]
    assert not is_complete_log(path)


def test_long_status_messages_are_cut_not_refused(tmp_path):
    path = tmp_path / "msg.h5"
    log = RunLogWriter(path, "{}", {}, {}, [], 1)
    log.close("diverged", "é" * 2000)
    message = open_log(path).status_message
    assert message.endswith("...") and len(message.encode()) <= 1024 and message.startswith("éé")
    with pytest.raises(ValueError):
        RunLogWriter(tmp_path / "x.h5", "{}", {}, {}, [], 1).set_status("done")


def test_writer_refuses_existing_files_and_missing_folders(tmp_path):
    path = tmp_path / "taken.h5"
    path.write_text("precious")
    with pytest.raises(UserError) as err:
        RunLogWriter(path, "{}", {}, {}, [], 1)
    assert err.value.culprit == str(path) and path.read_text() == "precious"
    missing = tmp_path / "no" / "such" / "dir" / "run.h5"
    with pytest.raises(UserError) as err:
        RunLogWriter(missing, "{}", {}, {}, [], 1)
    assert err.value.culprit == str(missing) and "\n" not in err.value.message


KILLED_WRITER = r"""
import json, sys, time
import numpy as np
from cnnpar.runlog import RunLogWriter
path, ranks = sys.argv[1], 2
log = RunLogWriter(path, json.dumps({"mode": "sync"}), {"mode": "sync"}, {"ranks": ranks}, [("w", (4,), 0, 4)], ranks)
def window(start, n, epoch):
    z = np.zeros((n, ranks), np.float32)
    return dict(step=np.arange(start, start + n), epoch=np.full(n, epoch), loss=np.ones(n), rank_loss=z + 1,
                samples=np.full(n, ranks), compute_s=z + 0.5, exchange_s=z, wait_s=z)
for epoch in range(3):
    log.append_steps(**window(epoch * 100, 100, epoch))
    log.append_epoch(epoch, (epoch + 1) * 100, 1.0, 0.5, 1.0, 0.4 + 0.1 * epoch, 1.0 + epoch, 200 * (epoch + 1))
    log.flush()
print("flushed", flush=True)
step = 300
while True:  # keeps appending without flushing until killed
    log.append_steps(**window(step, 50, 3))
    log.append_epoch(3, step + 50, 1.0, 0.5, 1.0, 0.9, 9.0, 999)
    step += 50
    time.sleep(0.01)
"""


def test_killed_writer_leaves_a_readable_log_with_every_flushed_epoch(tmp_path):
    path = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "flushed", proc.stderr.read()
        time.sleep(0.2)
        with open_log(path) as live:  # the run is still writing
            assert live.status == "running" and list(live.epochs["epoch"]) == [0, 1, 2]
        with h5py.File(path, "r") as plain:  # the file is closed between flushes: plain HDF5 opens it
            assert plain["committed_rows"][0] == 300
            assert np.array_equal(live.steps["step"], np.arange(300))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(path, "r") as plain:
        assert plain.attrs["status"] == b"running"  # what the dead writer left; readers know better:
    with open_log(path) as log:
        assert log.status == "incomplete" and not log.complete and log.final is None
        assert log.writer_alive is False
        assert list(log.epochs["epoch"]) == [0, 1, 2]
        np.testing.assert_allclose(log.epochs["test_acc"], [0.4, 0.5, 0.6])
        assert np.array_equal(log.steps["step"], np.arange(300))
        assert log.steps["compute_s"].shape == (300, 2)
    assert not is_complete_log(path)

    # resume from a checkpoint taken at step 200 / 2 epochs: rows after it are dropped, writing goes on
    log = RunLogWriter.reopen(path, 200, 2)
    assert log.rows("steps") == 200 and log.rows("epochs") == 2
    log.append_epoch(2, 300, 0.8, 0.6, 0.8, 0.65, 3.0, 600)
    log.close("complete")
    with open_log(path) as log:
        assert log.complete and log.resume_count == 1
        assert np.array_equal(log.steps["step"], np.arange(200))
        np.testing.assert_allclose(log.epochs["test_acc"], [0.4, 0.5, 0.65])
    assert not os.path.exists(f"{path}.rewrite-tmp")


def test_reopen_and_truncate_to(tmp_path):
    path = tmp_path / "resume.h5"
    _write_full_log(path, steps_per_epoch=40, epochs=2)
    before = open_log(path)
    log = RunLogWriter.reopen(path, step_count=30)
    assert log.rows("steps") == 30 and log.rows("audit") == 30 and log.rows("epochs") == 0
    assert log.rows("consistency") == 0 and log.rows("final") == 0 and log.rows("folds") == 0
    log.append_steps(**_step_window(np.random.default_rng(1), 30, 50, 3, 0))
    log.flush()
    mid = open_log(path)
    assert mid.status == "running" and np.array_equal(mid.steps["step"], np.arange(80))
    log.truncate_to(45, epoch_count=0)
    assert log.rows("steps") == 45
    log.close("interrupted", "SIGTERM")
    with open_log(path) as after:
        assert after.status == "interrupted" and after.status_message == "SIGTERM"
        assert after.resume_count == 2 and after.created == before.created
        assert np.array_equal(after.steps["step"], np.arange(45))
        np.testing.assert_array_equal(after.steps["loss"][:30], before.steps["loss"][:30])
        np.testing.assert_array_equal(after.audit["rel_l2_error"], before.audit["rel_l2_error"][:30])
        assert after.final is None and after.folds is None and len(after.epochs["epoch"]) == 0
        assert after.config == before.config and after.env == before.env and after.layout == before.layout


def test_rows_wait_in_memory_until_flush_and_are_never_lost(tmp_path, monkeypatch):
    from cnnpar.runlog import writer

    monkeypatch.setattr(writer, "PENDING_ROWS", 100)  # so that the size limit is reached too
    path = tmp_path / "buffered.h5"
    rng = np.random.default_rng(5)
    config = _config()
    windows = [_step_window(rng, start, 30, 3, 0) for start in range(0, 180, 30)]
    log = RunLogWriter(path, json.dumps(config, sort_keys=True), config, ENV, LAYOUT, 3)

    def rows_in_file():
        with h5py.File(path, "r") as raw:  # the writer keeps the file closed between flushes
            return raw["steps/step"].shape[0], int(raw["committed_rows"][0])

    for window in windows[:2]:
        log.append_steps(**window)
        log.append_consistency(window["step"][-1], 7, True)
    assert log.rows("steps") == 60 and log.rows("consistency") == 2
    assert rows_in_file() == (0, 0)  # not written yet: one write per flush, not per window
    log.flush()
    assert rows_in_file() == (60, 60)
    with open_log(path) as live:
        assert np.array_equal(live.steps["step"], np.arange(60)) and list(live.consistency["step"]) == [29, 59]
    for window in windows[2:5]:
        log.append_steps(**window)
    assert rows_in_file() == (60, 60)  # 90 rows wait ...
    log.append_steps(**windows[5])
    assert rows_in_file() == (180, 180)  # ... 120 reach the 100-row limit: flushed without being asked
    log.append_steps(**_step_window(rng, 180, 10, 3, 0))
    log.close("failed", "an error path")  # closing writes what waits
    with h5py.File(path, "r") as raw:
        assert np.array_equal(raw["steps/step"][:], np.arange(190))
        expected = np.concatenate([w["loss"] for w in windows])
        np.testing.assert_array_equal(raw["steps/loss"][:180], expected)


@pytest.mark.parametrize("fault", ["flipped byte", "short file", "/final stored wrong"])
def test_a_closing_write_that_reads_back_different_is_never_marked_complete(tmp_path, monkeypatch, fault):
    from cnnpar.errors import WriteError
    from cnnpar.runlog import writer

    path = tmp_path / "readback.h5"
    rng = np.random.default_rng(9)
    config = _config()
    log = RunLogWriter(path, json.dumps(config, sort_keys=True), config, ENV, LAYOUT, 3)
    log.append_steps(**_step_window(rng, 0, 40, 3, 0))
    log.append_epoch(0, 40, 1.0, 0.5, 1.1, 0.5, 2.0, 120)
    log.flush()
    log.append_steps(**_step_window(rng, 40, 40, 3, 1))
    log.write_final(rng.standard_normal(N_PARAMS).astype(np.float32), np.eye(10, dtype=np.int64), test_acc=0.5)
    real_pread = os.pread
    reads = []

    def bad_pread(fd, n, offset):  # the disk hands back something else than was written
        data = real_pread(fd, n, offset)
        reads.append((n, offset))
        end = reads[0][0] // 2  # half way through the file
        if fault == "short file":  # the file ends there
            return data[: max(0, end - offset)]
        if offset <= end < offset + len(data):  # one bit flipped there
            data = data[: end - offset] + bytes([data[end - offset] ^ 0x10]) + data[end - offset + 1:]
        return data

    if fault == "/final stored wrong":  # HDF5 keeps something else than it was given
        real_write_whole = writer._write_whole

        def bad_write_whole(dset, values):
            real_write_whole(dset, values + 1 if dset.name == "/final/confusion" else values)

        monkeypatch.setattr(writer, "_write_whole", bad_write_whole)
    else:
        monkeypatch.setattr(os, "pread", bad_pread)
    with pytest.raises(WriteError) as err:
        log.close("complete")
    what = "/final reads back different" if fault == "/final stored wrong" else "the file reads back different"
    assert what in err.value.message and "\n" not in err.value.message
    assert not is_complete_log(path)
    with open_log(path) as kept:  # the log as of its last good flush, marked failed
        assert kept.status == "failed" and "reads back different" in kept.status_message
        assert kept.steps["step"].tolist() == list(range(40)) and kept.final is None
    assert not os.path.exists(f"{path}.flush-tmp")


# ----------------------------------------------------------------------------------------------------
# bad files


def _assert_user_error(path, *words):
    with pytest.raises(UserError) as err:
        open_log(path)
    assert err.value.culprit == str(path), err.value
    assert "\n" not in err.value.message and err.value.message
    for word in words:
        assert word in err.value.message, err.value.message
    assert not is_complete_log(path)
    return err.value.message


@pytest.fixture(scope="module")
def good_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.h5"
    _write_full_log(path, steps_per_epoch=20, epochs=2)
    return path


def test_missing_file_and_directory(tmp_path):
    _assert_user_error(tmp_path / "absent.h5", "no such file")
    _assert_user_error(tmp_path, "directory")


def test_text_and_empty_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5\n" * 100)
    _assert_user_error(text, "not an HDF5 file")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _assert_user_error(empty, "not an HDF5 file")


def test_hdf5_that_is_not_a_run_log(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)
    _assert_user_error(path, "not a cnnpar run log")


def test_newer_format_version_asks_for_an_upgrade(tmp_path, good_log):
    path = tmp_path / "future.h5"
    path.write_bytes(good_log.read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = np.int64(FORMAT_VERSION + 1)
    _assert_user_error(path, "newer", "upgrade")


def test_log_with_a_group_missing_is_corrupt(tmp_path, good_log):
    path = tmp_path / "hollow.h5"
    path.write_bytes(good_log.read_bytes())
    with h5py.File(path, "r+") as f:
        del f["epochs"]
    _assert_user_error(path, "corrupt")


@pytest.mark.parametrize("fraction", [0.0005, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, good_log, fraction):
    data = good_log.read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(data[: max(9, int(len(data) * fraction))])
    _assert_user_error(path)


def test_the_user_error_is_printed_as_one_line_by_a_cli(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    code = "import sys; from cnnpar.errors import exit_on_user_error; from cnnpar.runlog import open_log; " \
           "exit_on_user_error(lambda: open_log(sys.argv[1]))()"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"cnnpar: error: {path}: not an HDF5 file, so not a cnnpar run log"]


def _meaningful_offsets(data: bytes) -> list:
    """Offsets worth corrupting: the non-zero bytes (metadata and written values), not chunk padding."""
    arr = np.frombuffer(data, np.uint8)
    return np.flatnonzero(arr).tolist()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_give_a_user_error_or_a_log_never_another_exception(good_log, tmp_path, data):
    original = good_log.read_bytes()
    offsets = _meaningful_offsets(original)
    damaged = bytearray(original)
    edits = data.draw(st.lists(st.tuples(st.one_of(st.sampled_from(offsets), st.integers(0, len(original) - 1)),
                                         st.integers(0, 255)), min_size=1, max_size=6))
    for offset, value in edits:
        damaged[offset] = value
    if data.draw(st.integers(0, 3), label="truncate if 0") == 0:
        damaged = damaged[: data.draw(st.integers(0, len(damaged)), label="length")]
    path = tmp_path / "fuzzed.h5"
    path.write_bytes(bytes(damaged))
    try:
        log = open_log(path)
    except UserError as err:
        assert err.culprit == str(path) and "\n" not in err.message
    else:
        assert log.status in ("running", "complete", "failed", "diverged", "interrupted")
    assert is_complete_log(path) in (True, False)


# ----------------------------------------------------------------------------------------------------
# the schema as data


def test_noise_tables_round_trip(tmp_path):
    path = tmp_path / "noise.h5"
    written = _write_full_log(path)
    log = open_log(path)
    for table in ("noise", "noise_epochs"):
        got = getattr(log, table)
        rows = written[table]
        assert len(got["step"]) == len(rows) > 0
        for name in rows[0]:
            assert np.array_equal(got[name], np.array([row[name] for row in rows]).astype(got[name].dtype)), name
    quiet = tmp_path / "no-noise.h5"
    with RunLogWriter(quiet, json.dumps(_config(noise_scale=False)), _config(noise_scale=False), ENV, LAYOUT,
                      3) as plain:
        plain.flush()
    assert open_log(quiet).noise is None and open_log(quiet).noise_epochs is None


def test_docs_embed_the_schema_table_verbatim():
    from cnnpar.runlog.schema import markdown_table

    text = (REPO / "docs" / "runlog.md").read_text()
    embedded = text.split("<!-- schema:begin -->\n", 1)[1].split("\n<!-- schema:end -->", 1)[0]
    assert embedded == markdown_table(), "docs/runlog.md differs from cnnpar.runlog.schema: paste " \
                                         "`python -m cnnpar.runlog schema` between the schema markers"


def test_the_file_matches_the_schema_and_every_dataset_describes_itself(tmp_path):
    from cnnpar.runlog.schema import SCHEMA

    path = tmp_path / "full.h5"
    _write_full_log(path)
    with h5py.File(path, "r") as f:
        names = []
        f.visit(names.append)
        datasets = {"/" + n for n in names if isinstance(f[n], h5py.Dataset)}
        documented = {e.path for e in SCHEMA if not e.is_attribute}
        assert datasets == documented  # a log with every optional group holds exactly the schema's datasets
        for entry in SCHEMA:
            if entry.is_attribute:
                group = f[entry.group]
                assert entry.name in group.attrs, entry.path
                value = group.attrs[entry.name]
                if entry.dtype.startswith("str"):
                    assert isinstance(value, bytes), entry.path
                else:
                    assert np.asarray(value).dtype == np.dtype(entry.dtype), entry.path
                continue
            dset = f[entry.path]
            assert dset.attrs["units"].decode() == entry.units, entry.path
            assert dset.attrs["description"].decode() == entry.description, entry.path
            assert dset.ndim == entry.ndim, entry.path
            if not entry.dtype.startswith("str"):
                assert dset.dtype == np.dtype(entry.dtype), entry.path
        assert f["final/params"].maxshape == f["final/params"].shape  # fixed-shape
        assert f["consistency/ok"].dtype == np.uint8
        assert f["config"].attrs["race_audit"].dtype == np.uint8  # no bool enum anywhere


def test_reader_refuses_a_dataset_of_the_wrong_dtype(tmp_path, good_log):
    bad = tmp_path / "retyped.h5"
    shutil.copy(good_log, bad)
    with h5py.File(bad, "r+") as f:
        del f["steps/loss"]
        f["steps"].create_dataset("loss", data=np.zeros(len(f["steps/step"]), np.float64))
    _assert_user_error(bad, "/steps/loss", "float64")


def test_info_says_what_a_log_holds(tmp_path):
    path = tmp_path / "full.h5"
    _write_full_log(path)
    done = subprocess.run([sys.executable, "-m", "cnnpar.runlog", "info", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: complete\n")
    assert "80 steps, last step 79, 2 epochs" in done.stdout and "no writer holds it" in done.stdout
    assert "complete: nothing to resume\n" in done.stdout and "--resume auto" not in done.stdout
    missing = subprocess.run([sys.executable, "-m", "cnnpar.runlog", "info", str(tmp_path / "nope.h5")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and missing.stderr.strip() == f"cnnpar: error: {tmp_path / 'nope.h5'}: no such file"


def _readme_frames_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Run logs"):readme.index("### Checkpoints")]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_frames_split_per_rank_columns_and_match_the_log(tmp_path):
    pandas = pytest.importorskip("pandas", reason="RunLog.frame needs the optional pandas (the frames extra)")
    path = tmp_path / "run.h5"
    written = _write_full_log(path)
    log = open_log(path)
    steps = log.frame("steps")
    assert len(steps) == 80
    assert [c for c in steps.columns if c.startswith("rank_loss")] == ["rank_loss_0", "rank_loss_1", "rank_loss_2"]
    for rank in range(3):
        np.testing.assert_array_equal(steps[f"compute_s_{rank}"].to_numpy(), log.steps["compute_s"][:, rank])
    assert steps["loss"].dtype == np.float32 and steps["step"].dtype == np.int64
    epochs = log.frame("epochs")
    assert list(epochs["test_acc"]) == [row["test_acc"] for row in written["epochs"]]
    assert list(log.frame("folds")["test_acc"]) == [0.9, 0.8]
    final = log.frame("final")
    assert len(final) == 1 and final["test_acc"][0] == 0.65 and final["steps"][0] == 80
    assert isinstance(log.frame("audit"), pandas.DataFrame)


def test_frame_of_a_missing_or_unknown_table_names_it(tmp_path):
    pytest.importorskip("pandas", reason="RunLog.frame needs the optional pandas (the frames extra)")
    path = tmp_path / "plain.h5"
    config = _config(race_audit=False, noise_scale=False, folds=1)
    with RunLogWriter(path, json.dumps(config), config, ENV, LAYOUT, 2) as log:
        log.close("complete")
    log = open_log(path)
    with pytest.raises(UserError, match=r"has no audit table \(written with --race-audit\)"):
        log.frame("audit")
    with pytest.raises(UserError, match="no such table"):
        log.frame("stpes")
    with pytest.raises(UserError, match="no final result yet"):
        log.frame("final")
    assert len(log.frame("steps")) == 0 and "rank_loss_1" in log.frame("steps").columns


def test_frame_without_pandas_is_one_line_saying_how_to_get_it(tmp_path):
    path = tmp_path / "run.h5"
    _write_full_log(path)
    script = ("import sys; sys.modules['pandas'] = None\n"  # a None entry makes `import pandas` fail
              "from cnnpar.errors import exit_on_user_error\nfrom cnnpar.runlog import open_log\n"
              f"exit_on_user_error(lambda: open_log({str(path)!r}).frame('steps'))()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "cnnpar: error: pandas: RunLog.frame needs pandas: pip install 'cnnpar[frames]' (or use "
        "`cnnpar runlog export --csv DIR`, which does not)"]


def test_the_readme_frames_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("pandas", reason="the README example reads a log into pandas (the frames extra)")
    (tmp_path / "runs").mkdir()
    _write_full_log(tmp_path / "runs" / "run.h5")
    monkeypatch.chdir(tmp_path)
    example = _readme_frames_example()
    assert len(example.strip().splitlines()) == 5
    exec(compile(example, "README.md", "exec"), {})


def test_csv_export_writes_every_table_without_pandas(tmp_path):
    import csv

    path = tmp_path / "run.h5"
    _write_full_log(path)
    out = tmp_path / "csv"
    # without pandas: the export must not need it
    script = ("import sys; sys.modules['pandas'] = None\nfrom cnnpar.runlog.__main__ import main\n"
              f"sys.exit(main(['export', {str(path)!r}, '--csv', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{t}.csv" for t in ("steps", "audit", "epochs", "consistency", "folds", "noise",
                                                "noise_epochs", "final"))
    assert sorted(done.stdout.split()) == sorted(str(out / n) for n in names)
    log = open_log(path)
    with open(out / "steps.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(log.flat_columns("steps")) and "wait_s_2" in rows[0] and len(rows) == 81
    table = dict(zip(rows[0], zip(*rows[1:])))
    for name, values in log.flat_columns("steps").items():  # every value read back exactly, NaN included
        np.testing.assert_array_equal(np.array(table[name], dtype=values.dtype), values, name)
    with open(out / "final.csv", newline="") as f:
        final = list(csv.DictReader(f))
    assert len(final) == 1 and float(final[0]["test_acc"]) == 0.65
    # a second export into the same folder replaces nothing: one line, exit 2
    again = subprocess.run([sys.executable, "-m", "cnnpar.runlog", "export", str(path), "--csv", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("cnnpar: error: --csv: ")
    assert "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_info_on_a_complete_run_with_its_last_checkpoint_beside_it_says_it_is_stale(tmp_path):
    """A checkpointed run that finished leaves its last checkpoint: `info` must not send the user to
    --resume auto (which would only answer `nothing to resume`), and says the checkpoint can go."""
    path = tmp_path / "done.h5"
    done = run_train(2, "--dataset", "mnist-5k", "--epochs", "2", "--checkpoint-every", "1e", "--log", path,
                     "--quiet")
    assert done.returncode == 0, done.stderr
    assert os.path.exists(f"{path}.ckpt")  # the first epoch's
    info = subprocess.run([sys.executable, "-m", "cnnpar.runlog", "info", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert info.stdout.startswith(f"{path}: complete\n") and "--resume auto" not in info.stdout, info.stdout
    assert f"the checkpoint {path}.ckpt is stale" in info.stdout and "can be removed" in info.stdout
    resumed = run_train(2, "--dataset", "mnist-5k", "--epochs", "2", "--checkpoint-every", "1e", "--log", path,
                        "--resume", "auto")
    assert resumed.returncode == 0 and "nothing to resume" in resumed.stdout + resumed.stderr  # what it said
    os.remove(f"{path}.ckpt")
    info = subprocess.run([sys.executable, "-m", "cnnpar.runlog", "info", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert "complete: nothing to resume" in info.stdout and "checkpoint" not in info.stdout, info.stdout
