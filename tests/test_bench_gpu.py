"""bench/gpu.py runs end to end on CPU in its quick mode (one cheap section: the
full quick run takes minutes on a loaded 2-core machine); the full run needs CUDA."""

from __future__ import annotations

import pytest
from _bench import bench_module


@pytest.fixture(scope="module")
def gpu_bench():
    with bench_module("gpu.py", "bench_gpu") as module:
        yield module


def test_quick_codec_section_runs_on_cpu_and_judges_no_bar(gpu_bench, capsys):
    report = gpu_bench.main(["--quick", "--device", "cpu", "--no-write", "--only", "codec"])
    assert "failed" not in report.sections["codec"]
    assert "device copy (reference)" in report.sections["codec"]
    assert [b[0] for b in report.bars] == ["codec encode+decode (every format)"]
    assert all(b[3] == "—" for b in report.bars)  # nothing judged off a GPU


def test_full_run_refuses_a_cpu(gpu_bench):
    with pytest.raises(SystemExit):
        gpu_bench.main(["--device", "cpu", "--no-write"])
