"""memfit._jit, the one loader of memfit's C++ extensions: a stale lock never hangs it,
a lock held too long falls back to eager kernels with one warning, and two Python
environments sharing one TORCH_EXTENSIONS_DIR each build once, in their own directory.

The loader tests build a tiny C++ extension (only ``Python.h``: about a second); one
test runs the real codec, without building it (its lock is held, so it falls back).
Every load runs in a fresh subprocess, as a new user's first run would.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

import memfit

SRC = str(Path(memfit.__file__).resolve().parents[1])

TINY_CPP = r"""
#include <Python.h>
#define MEMFIT_CAT2(a, b) a##b
#define MEMFIT_CAT(a, b) MEMFIT_CAT2(a, b)
#define MEMFIT_STR2(a) #a
#define MEMFIT_STR(a) MEMFIT_STR2(a)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, MEMFIT_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC MEMFIT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""

# Loads the tiny extension in a subprocess; prints what happened as JSON.
LOAD_TINY = """
import json, sys, time, warnings
from pathlib import Path
from memfit._jit import Extension
ext = Extension(name="memfit_test_tiny", sources=(Path({source!r}),), what="a test extension",
                cflags=("-O0",), ldflags=())
t0 = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = ext.load()
print(json.dumps({{"answer": module.answer(), "seconds": time.monotonic() - t0, "dir": str(ext.build_dir()),
                  "so": str(next(ext.build_dir().glob(ext.module_name + ".*so"))),
                  "warnings": [f"{{w.category.__name__}}: {{w.message}}" for w in caught]}}))
"""


def _env(ext_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MEMFIT_KERNELS", "MEMFIT_BUILD_LOCK_TIMEOUT")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext_dir), PYTHONPATH=SRC, OMP_NUM_THREADS="1", **extra)
    return env


def _run(python: str, script: str, env: dict, timeout: float) -> tuple[dict, str]:
    proc = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def tiny(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_CPP)
    return source


def _tiny_build_dir(tiny: Path, ext_dir: Path, monkeypatch) -> Path:
    from memfit._jit import Extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))
    ext = Extension(name="memfit_test_tiny", sources=(tiny,), what="a test extension", cflags=("-O0",), ldflags=())
    return ext.build_dir()


def test_stale_lock_does_not_hang(tiny, tmp_path, monkeypatch):
    """A build killed partway leaves torch's ``lock`` file (and memfit's own lock file,
    unlocked: its holder is gone). The next first use builds within 60 s, with one
    warning saying it removed the stale lock, and says on stderr that it builds."""
    ext_dir = tmp_path / "ext"
    bdir = _tiny_build_dir(tiny, ext_dir, monkeypatch)
    bdir.mkdir(parents=True)
    (bdir / "lock").write_bytes(b"")  # what torch's FileBaton leaves: an empty file
    (bdir / "memfit.lock").write_text("999999999\n")  # no such process
    t0 = time.monotonic()
    out, err = _run(sys.executable, LOAD_TINY.format(source=str(tiny)), _env(ext_dir), timeout=120)
    assert time.monotonic() - t0 < 60
    assert out["answer"] == 42
    assert len(out["warnings"]) == 1 and "stale build lock" in out["warnings"][0], out["warnings"]
    assert "memfit: building a test extension (once per environment" in err
    assert not (bdir / "lock").exists()


def test_stale_lock_in_the_codec_build_does_not_hang_the_first_codec_call(tmp_path):
    """The real codec: its build directory (copied from this session's build, so that
    no compiler runs) holds a stale torch lock and no 'built' stamp, as after a build
    killed while linking. The first codec call in a new process returns within 60 s
    on the fused kernels, with one warning, and rebuilds nothing."""
    import shutil

    from memfit.codec import _cpu

    try:
        _cpu.EXTENSION.load()  # this session's build (the other codec tests need it too)
    except Exception as exc:  # no compiler here: nothing to copy
        pytest.skip(f"the fused CPU codec kernels cannot be built here ({exc})")
    ext_dir = tmp_path / "ext"
    bdir = ext_dir / _cpu.EXTENSION.module_name
    built = min(os.stat(f).st_mtime_ns for f in _cpu.EXTENSION.build_dir().glob("*.o"))
    if any(os.stat(src).st_mtime_ns > built for src in _cpu.EXTENSION.sources):
        # A reused TORCH_EXTENSIONS_DIR whose build predates this checkout's (identical)
        # sources: without the stamp, ninja would rightly rebuild a copy of it, so the
        # killed build this test simulates (made after its sources) cannot be copied.
        pytest.skip("this environment's codec build is older than the checkout's sources")
    shutil.copytree(_cpu.EXTENSION.build_dir(), bdir, ignore=shutil.ignore_patterns("memfit-built", "memfit.lock"))
    (bdir / "lock").write_bytes(b"")
    so = next(bdir.glob(_cpu.EXTENSION.module_name + ".*so"))
    mtime = os.stat(so).st_mtime_ns
    script = textwrap.dedent("""
        import json, time, warnings
        import torch
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from memfit.codec import IntFormat, backend_name, decode, encode
            x = torch.randn(1000)
            y = decode(encode(x, IntFormat(bits=8, rounding="nearest")))
            name = backend_name("cpu")
        print(json.dumps({"backend": name, "seconds": time.monotonic() - t0, "err": float((y - x).abs().max()),
                          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
    """)
    t0 = time.monotonic()
    out, err = _run(sys.executable, script, _env(ext_dir), timeout=120)
    assert time.monotonic() - t0 < 60
    assert out["backend"] == "cpu" and out["err"] < 0.05
    assert len(out["warnings"]) == 1 and "stale build lock" in out["warnings"][0], out["warnings"]
    assert os.stat(so).st_mtime_ns == mtime and not (bdir / "lock").exists()


def test_second_load_imports_without_building(tiny, tmp_path, monkeypatch):
    ext_dir = tmp_path / "ext"
    first, err1 = _run(sys.executable, LOAD_TINY.format(source=str(tiny)), _env(ext_dir), timeout=120)
    mtime = os.stat(first["so"]).st_mtime_ns
    second, err2 = _run(sys.executable, LOAD_TINY.format(source=str(tiny)), _env(ext_dir), timeout=120)
    assert "memfit: building" in err1 and "memfit: building" not in err2
    assert second["so"] == first["so"] and os.stat(second["so"]).st_mtime_ns == mtime
    assert first["warnings"] == [] and second["warnings"] == []


def test_live_lock_held_past_timeout_falls_back_to_eager_once(tmp_path, monkeypatch):
    """Another live process holds the codec's build lock (here: this test process) for
    longer than MEMFIT_BUILD_LOCK_TIMEOUT: the first codec call falls back to the eager
    kernels with exactly one RuntimeWarning, however many calls follow."""
    from memfit.codec import _cpu

    ext_dir = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))
    bdir = _cpu.EXTENSION.build_dir()
    bdir.mkdir(parents=True)
    fd = os.open(bdir / "memfit.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    script = textwrap.dedent("""
        import json, time, warnings
        import torch, memfit
        from memfit.codec import IntFormat, backend_name, decode, encode
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(1000)
            for _ in range(3):
                y = decode(encode(x, IntFormat(bits=8, rounding="nearest")))
            name = backend_name("cpu")
        print(json.dumps({"backend": name, "seconds": time.monotonic() - t0, "err": float((y - x).abs().max()),
                          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
    """)
    try:
        out, err = _run(sys.executable, script, _env(ext_dir, MEMFIT_BUILD_LOCK_TIMEOUT="2"), timeout=120)
    finally:
        os.close(fd)
    assert out["backend"] == "eager" and out["seconds"] < 60
    assert out["err"] < 0.05
    assert len(out["warnings"]) == 1, out["warnings"]
    w = out["warnings"][0]
    assert w.startswith("RuntimeWarning: memfit: fused CPU kernels unavailable (BuildLockTimeout")
    assert f"pid {os.getpid()}" in w and "MEMFIT_BUILD_LOCK_TIMEOUT" in w
    assert "memfit: building" not in err


def _make_venv(path: Path) -> str | None:
    """A real second Python environment (its own sys.prefix) that imports this one's
    packages (torch) through a .pth file; None where venv cannot make one."""
    proc = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], capture_output=True, text=True)
    python = path / "bin" / "python"
    if proc.returncode != 0 or not python.exists():
        return None
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    Path(site).mkdir(parents=True, exist_ok=True)
    here = sysconfig.get_paths()["purelib"]
    (Path(site) / "memfit_test_parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return str(python)


def test_two_environments_build_once_each_and_never_rebuild_each_other(tiny, tmp_path):
    """Two virtual environments share one TORCH_EXTENSIONS_DIR (and one torch): each
    builds the extension once, in its own directory; loading again in either, after
    the other built, rebuilds nothing (the shared library's mtime is unchanged)."""
    pythons = [_make_venv(tmp_path / name) for name in ("env_a", "env_b")]
    if None in pythons:
        pytest.skip("python -m venv cannot create an environment here")
    ext_dir = tmp_path / "ext"
    script = LOAD_TINY.format(source=str(tiny))
    runs = []
    for python in pythons + pythons:  # a, b, a, b
        out, err = _run(python, script, _env(ext_dir), timeout=120)
        runs.append((out, "memfit: building" in err, os.stat(out["so"]).st_mtime_ns))
    (a1, built_a1, mt_a1), (b1, built_b1, mt_b1), (a2, built_a2, mt_a2), (b2, built_b2, mt_b2) = runs
    assert a1["dir"] != b1["dir"] and Path(a1["dir"]).parent == Path(b1["dir"]).parent == ext_dir
    assert built_a1 and built_b1 and not built_a2 and not built_b2
    assert (a2["dir"], mt_a2) == (a1["dir"], mt_a1) and (b2["dir"], mt_b2) == (b1["dir"], mt_b1)
    assert os.stat(a1["so"]).st_mtime_ns == mt_a1  # b's build did not touch a's
    assert all(r[0]["answer"] == 42 and r[0]["warnings"] == [] for r in runs)
