"""Process identity from /proc: start ticks read right, zombies told apart, trees walked safely."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from agent import procfs
from agent.process_tree import ProcessRef, ProcessTable
from harness.processes import wait_until


def test_start_ticks_are_read_past_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    # A command name with spaces and parentheses, which /proc/<pid>/stat does not escape.
    odd_name = tmp_path / "a) (b c"
    odd_name.symlink_to("/bin/sleep")
    children = [subprocess.Popen([str(odd_name), "30"]), subprocess.Popen(["sleep", "30"])]
    try:
        assert psutil.Process(children[0].pid).name() == "a) (b c"
        for pid in [os.getpid(), *(child.pid for child in children)]:
            stat = procfs.read_stat(pid)
            process = psutil.Process(pid)
            assert stat is not None
            assert (stat.pid, stat.ppid, stat.exited) == (pid, process.ppid(), False)
            # psutil reads the same field and adds the boot time: undo that, and the ticks agree
            since_boot = process.create_time() - psutil.boot_time()
            assert stat.start_ticks == round(since_boot * procfs.CLOCK_TICKS)
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_zombie_still_exists_but_is_not_alive_and_a_reaped_process_does_not_exist() -> None:
    child = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(child.pid)
    assert ref is not None and ref.alive() and ref.exists()
    os.kill(child.pid, signal.SIGKILL)
    wait_until(lambda: not ref.alive(), what="child exited")
    assert ref.exists(), "an unreaped child is a zombie: exited, but its PID is still taken"
    assert not ProcessTable.scan().alive(ref)
    child.wait()
    assert not ref.exists() and procfs.read_stat(child.pid) is None
    assert not ref.send(signal.SIGTERM)


def test_a_ref_with_other_start_ticks_is_not_the_process_and_is_not_signalled() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        ref = ProcessRef.of(child.pid)
        assert ref is not None
        earlier = ProcessRef(child.pid, ref.start_ticks - 1)  # the same PID, held by another process
        assert not earlier.exists() and not earlier.alive()
        assert not earlier.send(signal.SIGKILL)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_running_for_counts_from_the_start_on_the_boot_clock() -> None:
    began = time.monotonic()
    child = subprocess.Popen(["sleep", "30"])
    try:
        ref = ProcessRef.of(child.pid)
        assert ref is not None
        time.sleep(0.3)
        # one clock tick of resolution on the start, none on the clock that is read now
        assert 0.3 - 1 / procfs.CLOCK_TICKS <= ref.running_for() <= time.monotonic() - began + 0.05
    finally:
        child.kill()
        child.wait()


@pytest.mark.fast
def test_the_tree_walk_follows_children_and_skips_one_older_than_the_process_holding_its_parents_pid() -> (
    None
):
    # pid 10 is the root; 11 and 12 its children, 13 a grandchild. 20 names 12 as its parent but
    # started before 12 did: it was the child of an earlier process with PID 12, so it is not followed.
    table = ProcessTable(
        {
            stat.pid: stat
            for stat in [
                procfs.ProcStat(10, 1, 1000, False),
                procfs.ProcStat(11, 10, 1001, False),
                procfs.ProcStat(12, 10, 1002, False),
                procfs.ProcStat(13, 12, 1003, False),
                procfs.ProcStat(14, 11, 1004, True),  # a zombie: exited, not a live descendant
                procfs.ProcStat(20, 12, 900, False),
            ]
        }
    )
    assert table.descendants(ProcessRef(10, 1000)) == {
        ProcessRef(11, 1001),
        ProcessRef(12, 1002),
        ProcessRef(13, 1003),
    }
    assert table.descendants(ProcessRef(10, 999)) == set(), "another process holds PID 10 now"
