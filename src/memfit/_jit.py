"""Builds and loads memfit's C++ extensions: once per Python environment, never hanging.

memfit's fused CPU kernels (``codec/csrc``, ``optim/csrc``) are compiled on first use
with ``torch.utils.cpp_extension``. Left to itself, torch's loader shares one build
directory between every environment with the same torch (so two virtualenvs rebuild
each other's kernels) and waits forever on its ``lock`` file, which a build killed
partway (Ctrl-C, a crashed job) leaves behind. :class:`Extension` wraps it:

* **Per environment.** The build directory is
  ``$TORCH_EXTENSIONS_DIR/<name>_<build key>_<environment key>`` (torch's default root
  when the variable is unset). The build key hashes the sources, the flags and what the
  binary depends on (CPU model and features, for ``-march=native``; Python and torch
  versions); the environment key hashes ``sys.prefix`` and torch's location, so each
  environment builds once, in its own directory.
* **A lock that cannot go stale.** Builders take an exclusive ``flock`` on
  ``memfit.lock`` in the build directory. The kernel releases it when its holder dies,
  so a killed build never blocks the next one. Whoever holds it is the only process
  that may run torch's build in that directory, so a torch ``lock`` file found there is
  a leftover from a killed build: it is removed, with one ``RuntimeWarning``.
* **A timeout.** Waiting for another process's build gives up after ``lock_timeout``
  seconds (``MEMFIT_BUILD_LOCK_TIMEOUT``, default 300) with :class:`BuildLockTimeout`;
  callers then use their eager kernels (:mod:`memfit._backends` warns once).
* **Built once.** A successful build writes a ``memfit-built`` stamp; later loads
  import the shared library directly, without the lock, ninja or a compiler.
* **Said out loud.** A first build prints one line on stderr: what is being built and
  about how long it takes.

Without ``fcntl`` (Windows) there is no ``flock``: builds run under torch's own lock.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["CPU_CFLAGS", "CPU_LDFLAGS", "BuildLockTimeout", "Extension", "environment_key", "extensions_root"]

# -O3 for auto-vectorization; -ffp-contract=off keeps a*b+c as two rounded operations,
# as in the eager references (an FMA would change results). -march=native: the loops
# are written to vectorize, and AVX2/AVX-512 and F16C make them several times faster
# than the SSE2 baseline; the binary then only runs on CPUs like the one that built it,
# which is why the build key includes the CPU's model and feature flags.
CPU_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-Wno-psabi")
CPU_LDFLAGS = ("-fopenmp",)

LOCK_TIMEOUT_ENV = "MEMFIT_BUILD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 300.0
_STAMP = "memfit-built"
_LOCK = "memfit.lock"
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build directory
_POLL_SECONDS = 0.2


class BuildLockTimeout(RuntimeError):
    """Another process held the build lock for longer than the timeout."""


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def machine_key() -> str:
    """What a ``-march=native`` binary depends on: CPU model and feature flags, OS,
    Python and torch versions."""
    import torch

    parts = [platform.machine(), platform.system(), sys.version.split()[0], torch.__version__]
    try:
        with open("/proc/cpuinfo") as f:
            seen = set()
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen.add(key)
                    parts.append(line.strip())
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def environment_key() -> str:
    """A short hash naming this Python environment: ``sys.prefix`` and the directory
    torch is imported from (its headers and libraries are what a build links to)."""
    import torch

    return _hash(os.path.realpath(sys.prefix), os.path.realpath(os.path.dirname(torch.__file__)))[:10]


def extensions_root() -> Path:
    """``TORCH_EXTENSIONS_DIR`` when set, else torch's default build root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _lock_timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    text = os.environ.get(LOCK_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        out = float(text)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if not out >= 0:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a non-negative number of seconds")
    return out


_loaded: dict[str, ModuleType] = {}
_loaded_lock = threading.Lock()


@dataclass(frozen=True)
class Extension:
    """One C++ extension of memfit: its sources, flags and what it is called in the
    one line a first build prints (``what``, e.g. "the fused CPU codec kernels")."""

    name: str
    sources: tuple[Path, ...]
    what: str
    cflags: tuple[str, ...] = CPU_CFLAGS
    ldflags: tuple[str, ...] = CPU_LDFLAGS
    build_time: str = "about a minute"

    @functools.cached_property
    def module_name(self) -> str:
        """The Python module name of the built library (also its directory's name)."""
        srcs = [Path(s).read_bytes() for s in self.sources]
        build = _hash(*srcs, self.cflags, self.ldflags, machine_key())[:12]
        return f"{self.name}_{build}_env{environment_key()}"

    def build_dir(self) -> Path:
        return extensions_root() / self.module_name

    def load(self, lock_timeout: float | None = None) -> ModuleType:
        """The built extension module: imported if this environment built it before,
        else built now (one line on stderr). Raises :class:`BuildLockTimeout` when
        another live process holds the build lock past ``lock_timeout`` seconds, and
        whatever torch raises when the build fails (no compiler, no ninja, ...)."""
        name = self.module_name
        with _loaded_lock:
            if name in _loaded:
                return _loaded[name]
            module = self._load(name, _lock_timeout(lock_timeout))
            _loaded[name] = module
            return module

    def _load(self, name: str, lock_timeout: float) -> ModuleType:
        bdir = self.build_dir()
        if (bdir / _STAMP).exists():
            return _import(name, bdir)
        bdir.mkdir(parents=True, exist_ok=True)
        with _BuildLock(bdir / _LOCK, lock_timeout, self.what):
            if (bdir / _STAMP).exists():  # built by the process we waited for
                return _import(name, bdir)
            stale = bdir / _TORCH_LOCK
            if fcntl is not None and stale.exists():
                stale.unlink()
                warnings.warn(
                    f"memfit: removed a stale build lock left by an interrupted build ({stale})",
                    RuntimeWarning,
                    stacklevel=4,
                )
            print(f"memfit: building {self.what} (once per environment, {self.build_time})...",
                  file=sys.stderr, flush=True)
            from torch.utils import cpp_extension

            module = cpp_extension.load(
                name=name,
                sources=[str(s) for s in self.sources],
                extra_cflags=list(self.cflags),
                extra_ldflags=list(self.ldflags),
                build_directory=str(bdir),
                verbose=False,
            )
            (bdir / _STAMP).write_text(f"{name}\n")
            return module


def _import(name: str, bdir: Path) -> ModuleType:
    import torch  # noqa: F401  (the library links to libtorch: load it first)
    from torch.utils.cpp_extension import LIB_EXT

    spec = importlib.util.spec_from_file_location(name, bdir / f"{name}{LIB_EXT}")
    if spec is None or spec.loader is None:
        raise ImportError(f"memfit: cannot import the extension built in {bdir}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BuildLock:
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout`` seconds. The
    holder's pid is written in the file, for the timeout's message."""

    def __init__(self, path: Path, timeout: float, what: str):
        self.path, self.timeout, self.what = path, timeout, what
        self.fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        if fcntl is None:  # pragma: no cover - Windows: torch's own lock only
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise BuildLockTimeout(
                        f"another process{f' (pid {holder})' if holder else ''} has been building {self.what} "
                        f"for over {self.timeout:g} s (lock {self.path}); raise {LOCK_TIMEOUT_ENV} to wait longer"
                    ) from None
                time.sleep(_POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
