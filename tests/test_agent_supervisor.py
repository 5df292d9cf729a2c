"""The per-job supervisor: cheap to start (stdlib only) and in agreement with psutil on process identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from agent.supervisor import _create_time
from harness.agent import REPO_ROOT


def test_create_time_is_psutils_to_the_bit(tmp_path: Path) -> None:
    # A command name with spaces and parentheses, which /proc/<pid>/stat does not escape.
    odd_name = tmp_path / "a) (b c"
    odd_name.symlink_to("/bin/sleep")
    children = [subprocess.Popen([str(odd_name), "30"]), subprocess.Popen(["sleep", "30"])]
    try:
        for pid in [os.getpid(), *(child.pid for child in children)]:
            assert _create_time(pid) == psutil.Process(pid).create_time()
        assert psutil.Process(children[0].pid).name() == "a) (b c"
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_the_supervisor_imports_only_the_standard_library() -> None:
    """One supervisor starts per job: a third-party import there is paid on every run."""
    probe = "import json, sys, agent.supervisor; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-S", "-P", "-c", probe],  # as the agent starts it: no site
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=True,
        timeout=30,
    )
    modules = json.loads(done.stdout)
    outside = sorted(
        name for name in modules if name.split(".")[0] not in sys.stdlib_module_names | {"agent", "__main__"}
    )
    assert outside == []
    assert sorted(name for name in modules if name.startswith("agent")) == [
        "agent",
        "agent.jobfiles",
        "agent.supervisor",
    ]
