"""``agentic jobs list|show|log``: the sidecar's jobs for people on call, ``--json`` for scripts.

Exit codes: 0 done; 1 the sidecar refused or failed (the token included); 2 bad usage (no URL or
token); 3 no such job; 4 the sidecar could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from agentic_cli.client import USAGE, CliError, Sidecar, Target, environment
from agentic_cli.render import job_details, jobs_table, timeline

TERMINAL = ("SUCCEEDED", "FAILED")
FOLLOW_SECONDS = 1.0
LOG_CHUNK = 1 << 20


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agentic", description=__doc__.split("\n\n")[0])
    top.add_argument("--url", help="the sidecar's base URL (default: $AGENTIC_SIDECAR_URL)")
    top.add_argument("--token-file", help="file whose first line is the token (default: $AGENTIC_TOKEN)")
    top.add_argument("--ca-file", help="CA bundle for an https sidecar (default: the system's)")
    top.add_argument("--json", action="store_true", help="print JSON instead of tables")
    area = top.add_subparsers(dest="area", required=True)
    jobs = area.add_parser("jobs", help="jobs the sidecar knows").add_subparsers(
        dest="command", required=True
    )
    listing = jobs.add_parser("list", help="jobs, oldest first, matching every filter given")
    listing.add_argument("--dag", help="DAG id")
    listing.add_argument("--run", help="DAG run id")
    listing.add_argument("--status", choices=["QUEUED", "RUNNING", "STOPPING", "SUCCEEDED", "FAILED"])
    listing.add_argument("--limit", type=int, default=100)
    show = jobs.add_parser("show", help="one job and its audit trail, in time order")
    show.add_argument("job_id")
    log = jobs.add_parser("log", help="the job's output, from its agent")
    log.add_argument("job_id")
    log.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    log.add_argument("--tail", type=int, metavar="BYTES", help="only the last BYTES of the output so far")
    return top


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    out = out or sys.stdout
    try:
        target = Target.resolve(
            url=args.url, token_file=args.token_file, ca_file=args.ca_file, env=environment()
        )
        sidecar = Sidecar(target)
        try:
            return COMMANDS[args.command](sidecar, args, out)
        finally:
            sidecar.close()
    except CliError as exc:
        print(f"agentic: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _list(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    if args.limit < 1:
        raise CliError("--limit must be 1 or more", USAGE)
    params = {"dag_id": args.dag, "run_id": args.run, "status": args.status, "limit": args.limit}
    jobs = sidecar.json("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})["jobs"]
    out.write(json.dumps(jobs, indent=2) + "\n" if args.json else jobs_table(jobs))
    return 0


def _show(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    job = sidecar.json("GET", f"/jobs/{args.job_id}")
    events = sidecar.json("GET", f"/jobs/{args.job_id}/events")["events"]
    if args.json:
        out.write(json.dumps({"job": job, "events": events}, indent=2) + "\n")
    else:
        out.write(job_details(job) + "\n" + timeline(events))
    return 0


def _log(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    offset = 0
    if args.tail is not None:
        size = int(
            sidecar.raw(f"/jobs/{args.job_id}/log", params={"offset": 0, "limit": 1}).headers["X-Log-Size"]
        )
        offset = max(0, size - args.tail)
    while True:
        answer = sidecar.raw(f"/jobs/{args.job_id}/log", params={"offset": offset, "limit": LOG_CHUNK})
        data = answer.content
        if data:
            _write(out, data)
            offset = int(answer.headers.get("X-Next-Offset", offset + len(data)))
            continue
        if not args.follow or (
            sidecar.json("GET", f"/jobs/{args.job_id}")["status"] in TERMINAL
            and not _more(sidecar, args.job_id, offset)
        ):
            return 0
        time.sleep(FOLLOW_SECONDS)


def _more(sidecar: Sidecar, job_id: str, offset: int) -> bool:
    """Output written between the last read and the job's end."""
    return (
        int(sidecar.raw(f"/jobs/{job_id}/log", params={"offset": 0, "limit": 1}).headers["X-Log-Size"])
        > offset
    )


def _write(out: TextIO, data: bytes) -> None:
    out.write(data.decode("utf-8", errors="replace"))
    out.flush()


COMMANDS: dict[str, Callable[[Sidecar, argparse.Namespace, TextIO], int]] = {
    "list": _list,
    "show": _show,
    "log": _log,
}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
