"""Fetching MNIST and Fashion-MNIST: the published MD5s, the default mirrors, downloads written atomically
and verified (training itself never downloads)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import UserError
from . import locate

# Published MD5s of the gzipped files (the same values torchvision and the datasets' own pages list).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# yann.lecun.com now refuses downloads; Fashion-MNIST's S3 website endpoint is http-only, so it is left
# out of the defaults (pass it with --mirror to use it).
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/"),
}
CHECKSUMS = {"mnist": MNIST_MD5, "fashion-mnist": FASHION_MNIST_MD5}



def default_fetch_root() -> Path:
    env_value = os.environ.get("CNNPAR_DATA", "")
    if env_value:
        return Path(env_value).expanduser()
    project = locate.project_data_dir()
    if project is None:
        raise UserError("--dir", "no default data directory: the package is not running from the repository; "
                                 "pass --dir DIR or set $CNNPAR_DATA")
    return project


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_mirror(url: str, explicit: bool) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("https", "http") or (scheme == "http" and not explicit):
        raise UserError("--mirror", f"{url!r}: only https:// mirrors (or http:// ones given explicitly with "
                                    f"--mirror) are used")
    return url if url.endswith("/") else url + "/"


def _opener():
    import urllib.error
    import urllib.request

    class NoDowngrade(urllib.request.HTTPRedirectHandler):
        # an https mirror must not be able to send us to plain http
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if req.full_url.lower().startswith("https://") and not newurl.lower().startswith("https://"):
                raise urllib.error.URLError(f"refused redirect from https to {newurl}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(NoDowngrade)


def _download(opener, url: str, target: Path, expected_md5: str, timeout: float) -> int:
    """Download `url` to `target` atomically if its MD5 matches; returns bytes written. Raises on failure,
    leaving nothing behind."""
    import urllib.request

    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest, size = hashlib.md5(usedforsecurity=False), 0
        request = urllib.request.Request(url, headers={"User-Agent": "cnnpar-fetch"})
        with os.fdopen(fd, "wb") as out_file, opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out_file.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            if declared is not None and int(declared) != size:
                raise OSError(f"transfer cut short: {size} of {declared} bytes")
            out_file.flush()
            os.fsync(out_file.fileno())
        if digest.hexdigest() != expected_md5:
            raise _WrongFile(_wrong_file_reason(temp_name, digest.hexdigest(), expected_md5))
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
        return size
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


class _WrongFile(OSError):
    """The mirror answered, with something other than the published file: trying again will not help."""


def _wrong_file_reason(path: str, md5: str, expected_md5: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":
        return f"a gzip file with MD5 {md5}, expected {expected_md5}: not the published file"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML page, not a gzip file (the URL is not a mirror of these files)"
    return f"not a gzip file (it starts with {head[:8]!r})"


def fetch(name: str, root=None, mirrors: Sequence[str] | None = None, checksums: Mapping[str, str] | None = None,
          timeout: float = 60.0, report: Callable[[str], None] | None = None) -> Path:
    """Download dataset `name` into `<root>/<name>/`, verifying each file's MD5; returns that directory.

    Files already present with the right MD5 are kept. Each file is written atomically; a mismatch or an
    interrupted transfer leaves nothing behind. `mirrors` (explicit, so http:// is allowed) replace the
    default https ones; `checksums` (file name -> MD5) replace the published ones (tests serve their own
    files). `report` receives one line per file.
    """
    if name not in CHECKSUMS:
        raise UserError(name, f"unknown dataset to fetch; choose {' or '.join(CHECKSUMS)} (mnist-5k is bundled)")
    explicit = mirrors is not None
    mirror_urls = [_check_mirror(url, explicit) for url in (mirrors if explicit else MIRRORS[name])]
    if not mirror_urls:
        raise UserError("--mirror", "no mirror to fetch from")
    expected = dict(checksums if checksums is not None else CHECKSUMS[name])
    root = Path(root).expanduser() if root is not None else default_fetch_root()
    if any(Path(file_name).name != file_name or not file_name.endswith(".gz") for file_name in expected):
        raise ValueError(f"checksum keys are bare .gz file names, got {sorted(expected)}")
    target_dir = root / name
    created = [d for d in (target_dir, *target_dir.parents) if not d.exists()]  # deepest first
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError("--dir", f"cannot create {target_dir}: {err.strerror or err}") from None
    try:
        if not os.access(target_dir, os.W_OK | os.X_OK):
            raise UserError("--dir", f"{target_dir} is not writable")
        _fetch_files(target_dir, expected, mirror_urls, timeout, report or (lambda line: None))
    except BaseException:
        # a failed first fetch leaves the file system as it found it: no empty folders either
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return target_dir


def _fetch_files(target_dir: Path, expected: Mapping[str, str], mirror_urls: list[str], timeout: float,
                 say: Callable[[str], None]) -> None:
    import http.client
    import urllib.error

    opener = _opener()
    for file_name, md5 in expected.items():
        target = target_dir / file_name
        if target.is_file() and _md5_of(target) == md5:
            say(f"{target}: already present, MD5 verified")
            continue
        failures, transient = [], False
        for mirror in mirror_urls:
            url = mirror + file_name
            try:
                size = _download(opener, url, target, md5, timeout)
            except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as err:
                failures.append(f"{url} ({_reason(err)})")
                transient = transient or not isinstance(err, _WrongFile)
                continue
            say(f"{target}: {size:,} bytes from {url}, MD5 verified")
            break
        else:
            advice = "try again later or pass another --mirror URL" if transient else "pass another --mirror URL"
            raise UserError(target, f"could not be downloaded: {'; '.join(failures)}; {advice}")


def _reason(err: BaseException) -> str:
    import urllib.error

    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__
