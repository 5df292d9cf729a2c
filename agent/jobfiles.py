"""The names of the files in a job directory, and how they are replaced: shared by agent and supervisor.

What each file holds is described in :mod:`agent.state`, which reads and writes them as the agent's
types. This module needs ``os`` and ``json`` only, on purpose: the per-job supervisor imports it, and
every import there is paid once per job started (``pathlib`` and ``tempfile`` alone cost it ~7 ms).
"""

from __future__ import annotations

import json
import os

STATE_FILE = "state.json"
LOG_FILE = "output.log"
SHELL_FILE = "leader.json"  # the job's shell; the name older agents use, so a new one adopts their jobs
EXIT_FILE = "exit.json"
SUPERVISOR_LOG_FILE = "supervisor.log"
READ_MARKER_FILE = "outcome.read"  # exists once a GET answered the finished job's outcome (retention)
LOG_MARK_FILE = "log.mark"  # how far the task's log has shown the output (see JobDir.read_log_mark)


def write_json_atomic(path: str | os.PathLike[str], value: object, *, durable: bool = True) -> None:
    """Replace ``path`` with ``value`` as JSON; readers see the old or the new file, never a mix.

    The temporary file sits next to ``path`` (``os.replace`` is atomic only within one file system)
    under a random name, so concurrent writers never share one.
    """
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, separators=(",", ":"))
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
