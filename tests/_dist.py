"""Shared plumbing for the distributed tests (gloo, CPU, ``WORLD`` processes).

Starting a process costs seconds (importing torch, building kernels, torch._dynamo on
the first optimizer), so a test module shares one set of worker processes: each test
sends a function, every rank runs it (``fn(rank, *args)``, after which the ranks meet
at a barrier), and its outcome comes back. The workers do the work and the checks
themselves:

* a worker's exception fails the test with that rank's traceback;
* a test that outlives its timeout has the workers killed and fails ("hung?"), and once
  one rank has failed the others get a few seconds, not the whole timeout (they may be
  waiting for it in a collective), so a hang cannot stall CI;
* a failed or hung job kills the pool; the next test starts a fresh one, so a failure
  cannot leak into the next test. Closing the pool (end of the module) stops and joins
  the workers; they are daemons, so they also die with pytest.

Workers are ``torch.multiprocessing`` spawn processes: MASTER_ADDR=127.0.0.1 and a free
port (a port taken meanwhile is retried once), gloo, one intra-op thread each. Job
functions must be picklable: module-level functions of the test module.

Usage, in a test module::

    from _dist import Pool, needs_gloo

    pytestmark = needs_gloo

    @pytest.fixture(scope="module")
    def pool():
        with Pool() as p:
            yield p

    def _job(rank, arg): ...           # runs on every rank

    def test_something(pool):
        pool.run(_job, arg)
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

WORLD = 2
TIMEOUT_S = 120  # per job (each normally takes seconds); then the workers are killed

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world: int, port: int, conn) -> None:
    """A worker: joins the gloo group, then runs ``(fn, args)`` jobs until told to stop."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        conn.send(("ready", None))
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the parent went away
                break
            if job is None:
                break
            fn, args = job
            try:
                fn(rank, *args)
                dist.barrier()
                conn.send(("ok", None))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Pool:
    """``WORLD`` gloo worker processes, started on the first :meth:`run`."""

    def __init__(self, world: int = WORLD, timeout_s: float = TIMEOUT_S) -> None:
        self.world = world
        self.timeout_s = timeout_s
        self.procs: list = []
        self.conns: list = []

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        for attempt in range(2):
            port = _free_port()
            for rank in range(self.world):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(rank, self.world, port, child), daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            replies = self._collect("starting the workers", self.timeout_s)
            if all(status == "ready" for status, _ in replies):
                return
            self.kill()
            text = "\n".join(str(payload) for _, payload in replies)
            if attempt == 1 or "address already in use" not in text.lower():
                raise AssertionError(f"starting {self.world} gloo workers failed:\n{text}")

    def _collect(self, what: str, timeout_s: float) -> list[tuple[str, object]]:
        """One reply per rank. Once a rank has reported an error the others get a few
        seconds, not the full timeout (they may be waiting in a collective for it); a
        rank that does not answer in time, or dies, is reported as failed. Kills the
        pool unless every rank replied."""
        from multiprocessing.connection import wait

        replies: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world:
            pending = [c for r, c in enumerate(self.conns) if r not in replies]
            failed = any(status == "error" for status, _ in replies.values())
            left = min(deadline - time.monotonic(), 5.0 if failed else math.inf)
            ready = wait(pending, timeout=max(left, 0.0))
            if not ready:
                self.kill()
                why = "no reply after another rank failed" if failed else f"no reply within {timeout_s:g} s (hung?)"
                why = f"{what}: {why}"
                for r in range(self.world):
                    replies.setdefault(r, ("error", why))
                break
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    replies[rank] = ("error", f"worker died (exit code {self.procs[rank].exitcode})")
        return [replies[r] for r in range(self.world)]

    def run(self, fn, *args, timeout_s: float | None = None) -> None:
        """Run ``fn(rank, *args)`` on every rank; raise AssertionError with the failed
        ranks' tracebacks if any rank raised, died or did not answer within
        ``timeout_s`` (default: the pool's)."""
        if not self.procs:
            self._start()
        for conn in self.conns:
            conn.send((fn, args))
        replies = self._collect(fn.__name__, self.timeout_s if timeout_s is None else timeout_s)
        errors = [f"--- rank {r} ---\n{payload}" for r, (status, payload) in enumerate(replies) if status != "ok"]
        if errors:
            self.kill()  # a failed job can leave the group mid-collective: start afresh
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
        self.kill()


# ------------------------------------------------------------------ FSDP2 helpers


def fully_shard():
    """``torch.distributed.fsdp.fully_shard`` (FSDP2), or None where it is unavailable."""
    try:
        from torch.distributed.fsdp import fully_shard as fs
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import fully_shard as fs
        except ImportError:
            return None
    return fs


needs_fsdp2 = pytest.mark.skipif(fully_shard() is None, reason="FSDP2 (fully_shard) is unavailable")


def mesh(shape: tuple[int, ...] = (WORLD,)):
    """A CPU device mesh; 2-D meshes are named ("replicate", "shard") as HSDP expects."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("replicate", "shard")[-len(shape) :]
    return init_device_mesh("cpu", shape, mesh_dim_names=names)
