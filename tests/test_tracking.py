"""What provenance.json records about the machine's load: the contention a timing ran under, measured, not typed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from longctx.tracking import (RunRecorder, busy_processes, cpu_counters, environment, others_cpu_cores,
                              read_provenance)


@pytest.fixture
def stranger():
    """A busy process that is not ours: a spinning grandchild whose parent exits, so it is re-parented away from the
    test process (as another session's job would be)."""
    spinner = f"{sys.executable} -c 'while True: pass'"
    started = subprocess.run(["sh", "-c", f"{spinner} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                             check=True)
    pid = int(started.stdout)
    time.sleep(0.3)  # past the interpreter's start-up
    yield pid
    os.kill(pid, signal.SIGKILL)


def test_others_cpu_cores_counts_the_machine_less_this_process():
    start = {"machine": 100.0, "own": 10.0, "wall": 50.0}
    end = {"machine": 130.0, "own": 30.0, "wall": 60.0}  # 30 s of CPU in 10 s, 20 of them ours: others used 1 core
    assert others_cpu_cores(start, end) == 1.0
    assert others_cpu_cores(start, {**end, "machine": 125.0}) == 0.5
    assert others_cpu_cores(start, {**end, "machine": 110.0}) == 0.0  # never negative (counters read at two moments)
    assert others_cpu_cores(start, start) is None


def test_a_busy_stranger_is_counted_and_our_own_work_is_not(stranger):
    assert stranger in busy_processes(window=0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # our child: part of the run
    try:
        time.sleep(0.3)
        assert spinner.pid not in busy_processes(window=0.3)
    finally:
        spinner.kill()
        spinner.wait()
    start = cpu_counters()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # this process busy for 1 s: not "others"
        pass
    # the stranger holds at least about half a core on a machine of 2 loaded cores; this process's second is excluded
    assert 0.3 <= others_cpu_cores(start, cpu_counters()) <= (os.cpu_count() or 1)


def test_provenance_records_the_load_at_start_and_end(tmp_path, stranger):
    provenance = environment(torch.device("cpu"), torch.float32)
    assert provenance["torch_threads"] == torch.get_num_threads() and provenance["cpu_count"] == os.cpu_count()
    assert provenance["cpu_model"] is None or isinstance(provenance["cpu_model"], str)
    start = provenance["load"]["start"]
    assert len(start["loadavg"]) == 3 and start["busy_processes"] >= 1  # the stranger
    recorder = RunRecorder(tmp_path / "run", {"task": {"name": "passkey"}}, provenance, wandb_mode="disabled")
    assert read_provenance(tmp_path / "run")["load"] == {"start": start}  # a run still going has no end record
    recorder.finish({"accuracy@256": 1.0}, {}, {})
    load = read_provenance(tmp_path / "run")["load"]
    assert load["start"] == start and load["end"]["busy_processes"] >= 1
    assert load["others_cpu_cores"] >= 0.0


def test_a_failed_run_records_its_load_too(tmp_path):
    recorder = RunRecorder(tmp_path / "run", {"task": {"name": "passkey"}}, environment(torch.device("cpu"), torch.float32),
                           wandb_mode="disabled")
    recorder.fail(RuntimeError("out of memory"))
    provenance = read_provenance(tmp_path / "run")
    assert provenance["status"] == "failed" and set(provenance["load"]) == {"start", "end", "others_cpu_cores"}

