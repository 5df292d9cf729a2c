"""What capping a job's output as it is written costs a fast writer (agent/logcap.py).

    python -m bench.output_cap                      # 300 MiB and 1 M lines, cap 2 MiB, 3 runs of each
    python -m bench.output_cap --mib 100 --lines 0 --runs 5

Two jobs: ``yes | head -c <mib>M`` (a flood in 8 KiB writes), and ``<lines>`` lines written one at a
time (``awk``, ``fflush()`` after each: the worst case for a pipe, one wake-up of the supervisor per
line when it keeps up). Each runs under a real supervisor (``python -m agent.supervisor``, started
and answered as the agent does it), alternately in two ways: with ``max_log_bytes = 0`` its stdout
is ``output.log`` itself (the direct writes every job made before), with the cap it is the pipe the
supervisor copies into ``output.log``, punching as it writes. For each run: the job's throughput
(its output over the time from ``leader.json``'s start to ``exit.json``'s end, both written by the
supervisor), the CPU of the job and its supervisor together (user + system, as ``wait4`` reports
the supervisor with the children it reaped; the supervisor's start included), and the on-disk bytes
of ``output.log`` (``st_blocks * 512``), at their peak (sampled every 10 ms) and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from agent.spawn import handshake
from agent.state import ShellRecord
from harness.agent import REPO_ROOT

MIB = 1024 * 1024


@dataclass(frozen=True)
class Run:
    mib_per_s: float
    seconds: float
    cpu: float  # the supervisor's and the job's, user + system
    peak: int
    final: int


def peak_on_disk(path: Path, done: threading.Event, peak: list[int]) -> None:
    while not done.is_set():
        try:
            peak[0] = max(peak[0], os.stat(path).st_blocks * 512)
        except FileNotFoundError:
            pass
        done.wait(0.01)


def one_run(job_dir: Path, command: str, cap: int) -> Run:
    job_dir.mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
    log = job_dir / "output.log"
    done, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_on_disk, args=(log, done, peak), daemon=True)
    sampler.start()
    with (job_dir / "supervisor.log").open("ab") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-P", "-m", "agent.supervisor", str(job_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=job_dir,
            env=env,
            start_new_session=True,
        )
    spec = {"command": command, "cwd": str(job_dir), "env": env, "max_log_bytes": cap}
    answer = handshake(proc, json.dumps(spec).encode())
    if not isinstance(answer, ShellRecord):
        raise RuntimeError(f"the supervisor did not start the job: {answer}")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    ended = datetime.fromisoformat(json.loads((job_dir / "exit.json").read_text())["finished_at"])
    seconds = (ended - answer.started_at).total_seconds()
    stat = log.stat()
    log.unlink()  # 300 MiB of page cache and, written directly, of disk
    final = stat.st_blocks * 512
    return Run(
        stat.st_size / MIB / seconds, seconds, usage.ru_utime + usage.ru_stime, max(peak[0], final), final
    )


def summary(name: str, runs: list[Run]) -> str:
    rates = [run.mib_per_s for run in runs]
    return (
        f"| {name} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
        f"| {statistics.median(run.seconds for run in runs):.2f} "
        f"| {statistics.median(run.cpu for run in runs):.2f} "
        f"| {max(run.peak for run in runs) / MIB:.1f} | {max(run.final for run in runs) / MIB:.1f} |"
    )


LINES = "awk 'BEGIN {{ for (i = 0; i < {lines}; i++) {{ print \"a line of output\", i; fflush() }} }}'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=300, help="the flood's output, MiB (default 300; 0: none)")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines written one by one (0: none)")
    parser.add_argument("--cap", type=int, default=2 * MIB, help="max_log_bytes (default 2 MiB)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each way (default 3)")
    args = parser.parse_args()
    jobs = [
        (f"`yes \\| head -c {args.mib}M`", f"yes | head -c {args.mib}M", args.mib),
        (f"{args.lines:,} lines, a write each", LINES.format(lines=args.lines), args.lines),
    ]
    ways = [
        ("output.log itself (`max_log_bytes = 0`)", 0),
        (f"the pipe, capped at {args.cap / MIB:g} MiB", args.cap),
    ]
    print(f"{args.runs} runs of each, alternately\n")
    print(
        "| job | its stdout and stderr | MiB/s, median (min-max) | job s | CPU s, job + supervisor "
        "| peak on disk MiB | at the end MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-output-cap-") as tmp:
        for job, command, amount in jobs:
            if not amount:
                continue
            results: list[list[Run]] = [[] for _ in ways]
            for index in range(args.runs):  # alternately, so that a busier moment costs both
                for number, (_, cap) in enumerate(ways):
                    job_dir = Path(tmp) / f"{len(os.listdir(tmp))}-{index}-{number}"
                    results[number].append(one_run(job_dir, command, cap))
            for (way, _), runs in zip(ways, results, strict=True):
                print(f"| {job} {summary(way, runs)}")
            direct, capped = (statistics.median(run.mib_per_s for run in runs) for runs in results)
            print(f"| | through the pipe: {capped / direct:.0%} of direct writes | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
