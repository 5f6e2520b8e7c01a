"""Where numba's on-disk cache of cnnpar's kernels lives, keyed so that it can never go stale.

numba keys a cached function on its own source file only, so a driver that inlines a kernel from
another file would load stale machine code after that file was edited. So cnnpar points numba
(NUMBA_CACHE_DIR, set when the package is imported, unless you set it yourself) at a folder named by a
hash of every cnnpar source file that holds numba code (a function under a numba decorator) or that
such a file imports from, of the numba, llvmlite, numpy and Python versions, and of this CPU (model and
feature flags): any edit to any of those files starts a fresh cache. numba's own index still keys
every entry on the CPU too, so another machine's code is never loaded.

The folders are under $CNNPAR_CACHE_DIR, else $XDG_CACHE_HOME/cnnpar, else ~/.cache/cnnpar; old ones
stay until `python -m cnnpar.warmup --clear` removes them (a few MB each). Where that folder cannot be
created (no writable home), the system's temp folder holds them (cnnpar-<uid>/). A NUMBA_CACHE_DIR you set
yourself is used as it is: then clear it after editing a kernel (`--clear` removes cnnpar's part of it).

Only the standard library is imported here: this runs before numba is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import threading

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SET_BY_US = "CNNPAR_SET_NUMBA_CACHE_DIR"  # what this module put in NUMBA_CACHE_DIR, seen by child processes
# a decorator that hands a function to numba's compiler, at the start of a line
_NUMBA_DECORATOR = re.compile(rb"^[ \t]*@(?:numba\.)?(?:njit|jit|intrinsic|overload\w*|generated_jit|vectorize|"
                              rb"guvectorize|cfunc|register_jitable)\b", re.MULTILINE)


def cache_root() -> str:
    """The folder holding every kernel cache cnnpar makes."""
    explicit = os.environ.get("CNNPAR_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnnpar")


_RELATIVE_IMPORT = re.compile(rb"^[ \t]*from[ \t]+(\.+)([\w.]*)[ \t]+import[ \t]+\(?([\w, \t]+)", re.MULTILINE)


def kernel_sources() -> list:
    """Every source file of the package that holds numba code (a function under a numba decorator; a
    subpackage's too) and every package module those import from, transitively (their constants are
    frozen into the machine code), sorted."""
    texts = {}
    for folder, _, names in os.walk(_PACKAGE_DIR):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    texts[path] = f.read()
    found = {path for path, text in texts.items() if _NUMBA_DECORATOR.search(text)}
    todo = list(found)
    while todo:
        path = todo.pop()
        for dots, module, names in _RELATIVE_IMPORT.findall(texts[path]):
            base = os.path.dirname(path)
            for _ in range(len(dots) - 1):
                base = os.path.dirname(base)
            stem = os.path.join(base, *module.decode().split(".")) if module else base
            candidates = [stem + ".py", os.path.join(stem, "__init__.py")]
            if not module:  # `from . import a, b`: modules a and b
                candidates = [os.path.join(base, n.split()[0].decode() + ".py") for n in names.split(b",") if n.strip()]
            for candidate in candidates:
                if candidate in texts and candidate not in found:
                    found.add(candidate)
                    todo.append(candidate)
    return sorted(found)


def _version_file(package: str) -> bytes:
    """A package's _version.py, found without importing it (importing numba is what we prepare for)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return b""
    path = os.path.join(list(spec.submodule_search_locations)[0], "_version.py")
    try:
        with open(path, "rb") as f:
            return path.encode() + f.read()
    except OSError:
        return path.encode()


def _cpu_identity() -> bytes:
    """The CPU model and feature flags (the first processor of /proc/cpuinfo), else the machine name."""
    import platform

    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read()
    except OSError:
        return platform.machine().encode()
    first = text.split(b"\n\n", 1)[0]
    keep = (b"model name", b"flags", b"vendor_id", b"cpu family", b"model\t", b"Features", b"CPU part")
    return b"\n".join(line for line in first.splitlines() if line.startswith(keep)) + platform.machine().encode()


def cache_key() -> str:
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(_PACKAGE_DIR.encode())
    for path in kernel_sources():
        with open(path, "rb") as f:
            digest.update(os.path.relpath(path, _PACKAGE_DIR).encode() + b"\0" + f.read())
    for package in ("numba", "llvmlite", "numpy"):
        digest.update(_version_file(package))
    digest.update(_cpu_identity())
    return digest.hexdigest()[:20]


def kernel_cache_dir() -> str:
    return os.path.join(cache_root(), f"numba-{cache_key()}")


def use_kernel_cache() -> None:
    """Point numba's cache at the folder for these sources, this CPU and these versions (before numba
    compiles anything of cnnpar's; a NUMBA_CACHE_DIR the user set is kept)."""
    current = os.environ.get("NUMBA_CACHE_DIR")
    if current and current != os.environ.get(_SET_BY_US):
        return  # the user's own choice (one inherited from a parent that imported cnnpar is ours: redo it)
    folder = kernel_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # no writable home (some containers and CI runners): the temp folder, per user
        import tempfile

        folder = os.path.join(tempfile.gettempdir(), f"cnnpar-{os.getuid()}", os.path.basename(folder))
    os.environ["NUMBA_CACHE_DIR"] = os.environ[_SET_BY_US] = folder
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba came first (a test, a notebook): make it read the variable again
        config.reload_config()


def clear_caches() -> list:
    """Remove cnnpar's kernel caches: its folders under cache_root(), cnnpar's part of a NUMBA_CACHE_DIR
    the user set, and any numba cache in the package's own __pycache__ folders. Returns what was removed."""
    import shutil
    import tempfile

    removed = []
    for root in (cache_root(), os.path.join(tempfile.gettempdir(), f"cnnpar-{os.getuid()}")):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if name.startswith("numba-") or name == "compile_seconds.json":
                path = os.path.join(root, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    folders = {os.path.dirname(path) for path in kernel_sources()}
    user_dir = os.environ.get("NUMBA_CACHE_DIR", "")
    if user_dir and user_dir != os.environ.get(_SET_BY_US):
        from numba.core.caching import _CacheLocator

        for folder in folders:
            sub = os.path.join(user_dir, _CacheLocator.get_suitable_cache_subpath(os.path.join(folder, "x.py")))
            if os.path.isdir(sub):
                shutil.rmtree(sub, ignore_errors=True)
                removed.append(sub)
    for folder in folders:
        pycache = os.path.join(folder, "__pycache__")
        if os.path.isdir(pycache):
            for name in os.listdir(pycache):
                if name.endswith((".nbi", ".nbc")):
                    os.remove(os.path.join(pycache, name))
                    removed.append(os.path.join(pycache, name))
    return removed


def serialize_cache_saves() -> None:
    """Make numba's cache saves safe when several processes compile at once.

    A save rewrites a function's whole index: two processes adding different entries for the same
    function at once could leave an index naming a data file the other one wrote. numba has no lock,
    so take an flock on the cache folder around each save (saves happen only after a compile: rare)."""
    import fcntl

    from numba.core import caching

    cls = getattr(caching, "IndexDataCacheFile", None)
    if cls is None or getattr(cls.save, "_cnnpar_locked", False):
        return
    unlocked = cls.save

    def save(self, key, data):
        with _saving_lock:
            _saving[0] += 1
        try:
            with open(os.path.join(self._cache_path, ".cnnpar-save.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    unlocked(self, key, data)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            with _saving_lock:
                _saving[0] -= 1
                if not _saving[0] and _deferred:
                    _deferred.pop()()

    save._cnnpar_locked = True
    cls.save = save


_saving = [0]   # cache saves in progress in this process
_deferred = []  # what after_saves() put off until they end
# The main thread saves; a start-up stop may come from the signal watcher thread (cnnpar.signals) or from a
# handler running inside a save on the main thread itself (hence reentrant).
_saving_lock = threading.RLock()


def after_saves(action) -> None:
    """Run `action` now, or, when a signal handler calls this inside a cache save, right after the save
    (a save is a few milliseconds): an exit then never leaves an index without its data file."""
    with _saving_lock:
        if _saving[0]:
            _deferred[:] = [action]
        else:
            action()


def recorded_seconds() -> dict:
    """Task name -> seconds its compile took here, scaled to a machine with a core per process (see
    record_seconds); {} when nothing was recorded."""
    try:
        with open(os.path.join(cache_root(), "compile_seconds.json")) as f:
            return {str(k): float(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_seconds(seconds_by_task: dict, busy: float = 1.0) -> None:
    """Keep each task's measured compile time for the next announcement (best effort), divided by `busy`
    (processes per core while it compiled, at least 1): a compile on a loaded machine took that much
    longer than it will on an idle one, and the next announcement scales by its own machine's load."""
    recorded = recorded_seconds()
    recorded.update({name: round(s / max(1.0, busy), 3) for name, s in seconds_by_task.items()})
    try:
        os.makedirs(cache_root(), exist_ok=True)
        path = os.path.join(cache_root(), "compile_seconds.json")
        with open(path + ".tmp", "w") as f:
            json.dump(recorded, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
