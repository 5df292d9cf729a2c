"""The per-job supervisor: cheap to start (stdlib only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.agent import REPO_ROOT


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
        "agent.logcap",
        "agent.procfs",
        "agent.supervisor",
    ]
