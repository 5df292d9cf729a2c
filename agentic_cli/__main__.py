"""``agentic jobs list|show|log|stop`` and ``agentic agents list|drain|undrain``: the sidecar's API
for people on call, ``--json`` for scripts.

The options that say where the sidecar is and how to print (``--url``, ``--token-file``, ``--ca-file``,
``--json``) go before or after the subcommand: ``agentic --json jobs list`` is ``agentic jobs list --json``.

Exit codes: 0 done; 1 the sidecar refused or failed (the token included; a stop Airflow does not
confirm); 2 bad usage (no URL or token); 3 no such job or agent; 4 the sidecar could not be reached
(its certificate not verified included).
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from agentic_cli.client import USAGE, CliError, Sidecar, Target, environment
from agentic_cli.render import agents_table, job_details, jobs_table, timeline

TERMINAL = ("SUCCEEDED", "FAILED")
FOLLOW_SECONDS = 1.0
LOG_CHUNK = 1 << 20


def global_options(into: argparse.ArgumentParser, *, defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes. On each command's parser they have no default
    (``defaults=False``): one given after the subcommand overrides the same given before it, one not
    given there leaves the value from before it (or the default) alone."""

    def default(value: object) -> Any:
        return value if defaults else argparse.SUPPRESS

    into.add_argument(
        "--url", default=default(None), help="the sidecar's base URL (default: $AGENTIC_SIDECAR_URL)"
    )
    into.add_argument(
        "--token-file",
        default=default(None),
        help="file whose first line is the token "
        "(default: $AGENTIC_TOKEN_FILE, or the token itself in $AGENTIC_TOKEN)",
    )
    into.add_argument(
        "--ca-file",
        default=default(None),
        help="CA bundle (PEM) that signed an https sidecar's certificate "
        "(default: $AGENTIC_CA_FILE, else the system's CAs)",
    )
    into.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of tables"
    )
    return into


def parser() -> argparse.ArgumentParser:
    top = global_options(
        argparse.ArgumentParser(prog="agentic", description=__doc__.split("\n\n")[0]), defaults=True
    )
    shared = global_options(argparse.ArgumentParser(add_help=False), defaults=False)
    area = top.add_subparsers(dest="area", required=True)
    jobs = area.add_parser("jobs", help="jobs the sidecar knows").add_subparsers(
        dest="command", required=True
    )
    listing = jobs.add_parser(
        "list", help="the latest jobs matching every filter given, newest first", parents=[shared]
    )
    listing.add_argument("--dag", help="DAG id")
    listing.add_argument("--run", help="DAG run id")
    listing.add_argument("--agent", help="agent id")
    listing.add_argument("--since", help="created since: an ISO-8601 time, or an age such as 90m, 12h, 2d")
    listing.add_argument("--status", choices=["QUEUED", "RUNNING", "STOPPING", "SUCCEEDED", "FAILED"])
    listing.add_argument("--limit", type=int, default=100)
    show = jobs.add_parser("show", help="one job and its audit trail, in time order", parents=[shared])
    show.add_argument("job_id")
    log = jobs.add_parser("log", help="the job's output, from its agent", parents=[shared])
    log.add_argument("job_id")
    log.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    log.add_argument("--tail", type=int, metavar="BYTES", help="only the last BYTES of the output so far")
    stop = jobs.add_parser(
        "stop",
        help="stop a job whose task Airflow no longer wants (the sidecar confirms with Airflow first)",
        parents=[shared],
    )
    stop.add_argument("job_id")
    stop.add_argument("--reason", required=True, help="why, for the job's audit trail")
    stop.add_argument(
        "--force",
        action="store_true",
        help="stop it even though Airflow still wants the task (said so in the audit)",
    )
    agents = area.add_parser("agents", help="the agents the sidecar routes to")
    agent_commands = agents.add_subparsers(dest="command", required=True)
    agent_commands.add_parser("list", help="each agent's state, capacity and jobs", parents=[shared])
    drain = agent_commands.add_parser(
        "drain",
        help="no new job goes there; running ones go on (until --timeout: then they are stopped)",
        parents=[shared],
    )
    drain.add_argument("agent_id")
    drain.add_argument(
        "--timeout",
        metavar="AGE",
        help="stop what still runs after this long (30m, 2h...): recorded as such, the tasks fail and may "
        "retry elsewhere",
    )
    drain.add_argument("--comment", default="", help="why, shown with the agent until it is undrained")
    maintenance = agent_commands.add_parser(
        "maintenance",
        help="put an agent in maintenance with a comment (a drain: no new job, running ones go on), kept "
        "across restarts of the agent and the sidecar; --off takes it out",
        parents=[shared],
    )
    maintenance.add_argument("agent_id")
    maintenance.add_argument("--comment", default="", help="why: shown in agents list, GET /agents and /ui")
    maintenance.add_argument("--off", action="store_true", help="end the maintenance: take jobs again")
    for name, text in (
        ("undrain", "take jobs again"),
        (
            "revoke",
            "end a registered agent's credential: its heartbeats are refused, no new job goes there, "
            "its jobs end FAILED once it is lost; its id registers again only once forgotten",
        ),
        ("forget", "remove a registered agent that is revoked, or lost, and holds no active job"),
    ):
        agent_commands.add_parser(name, help=text, parents=[shared]).add_argument("agent_id")
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
            return COMMANDS[args.area, args.command](sidecar, args, out)
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
    params = {
        "dag_id": args.dag,
        "run_id": args.run,
        "status": args.status,
        "agent_id": args.agent,
        "since": since(args.since) if args.since else None,
        "limit": args.limit,
        "newest_first": "true",
    }
    jobs = sidecar.json("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})["jobs"]
    out.write(json.dumps(jobs, indent=2) + "\n" if args.json else jobs_table(jobs))
    return 0


AGE = re.compile(r"(\d{1,9})([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str, option: str) -> int:
    """An age such as ``30m`` or ``2h`` in seconds; CliError (bad usage) otherwise."""
    found = AGE.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise CliError(f"{option} {text!r}: give a duration such as 90s, 30m, 2h or 1d", USAGE)
    return int(found.group(1)) * UNIT_SECONDS[found.group(2)]


def since(text: str) -> str:
    """``--since``: an age (``90m``, ``12h``, ``2d``) as the ISO time that long ago, or an ISO time
    (with its UTC offset) as it is; CliError (bad usage) otherwise."""
    found = AGE.fullmatch(text.strip())
    if found:
        ago = timedelta(seconds=int(found.group(1)) * UNIT_SECONDS[found.group(2)])
        return (datetime.now(UTC) - ago).isoformat(timespec="seconds")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise CliError(
            f"--since {text!r}: give an age such as 90m, 12h, 2d or a time with its UTC offset", USAGE
        )
    return moment.isoformat()


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
        following = int(answer.headers.get("X-Next-Offset", offset + len(data)))
        if following > offset:  # bytes, or a jump past output the agent dropped (a note says so)
            offset = following
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


def _stop(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    """Through the sidecar's confirmed path: it reads the task instance from Airflow and stops the job
    only if Airflow no longer wants it (409 otherwise); ``--force`` skips that, and the audit trail
    says so. Who asked goes into the audit trail either way."""
    how = "agentic jobs stop --force" if args.force else "agentic jobs stop"
    reason = f"{args.reason} (asked by {getpass.getuser()} through {how})"
    body = {"job_id": args.job_id, "status": "stop_requested", "reason": reason, "force": args.force}
    answer = sidecar.json("POST", "/jobs/update_status", json=body, ok=(200, 202, 409))
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    else:
        out.write(f"{answer.get('action')}: {answer.get('message')}\n")
    return 0 if answer.get("action") in ("stopped", "stop_requested", "stop_pending", "already_final") else 1


def _agents(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    agents = sidecar.json("GET", "/agents")["agents"]
    out.write(json.dumps(agents, indent=2) + "\n" if args.json else agents_table(agents))
    return 0


def _drain(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    """drain, undrain, and maintenance (a drain with a comment; --off: an undrain)."""
    draining = args.command in ("drain", "maintenance") and not getattr(args, "off", False)
    body: dict[str, object] = {}
    if draining:
        body["by"] = f"{getpass.getuser()} through agentic agents {args.command}"
        if args.comment:
            body["comment"] = args.comment
        if getattr(args, "timeout", None):
            body["timeout_seconds"] = seconds(args.timeout, "--timeout")
    elif getattr(args, "comment", ""):
        raise CliError("--off takes no --comment: the comment goes with the maintenance", USAGE)
    verb = "drain" if draining else "undrain"
    agent = sidecar.json("POST", f"/agents/{args.agent_id}/{verb}", json=body)
    out.write(json.dumps(agent, indent=2) + "\n" if args.json else agents_table([agent]))
    return 0


def _revoke(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    answer = sidecar.json("POST", f"/agents/{args.agent_id}/revoke")
    out.write(
        json.dumps(answer, indent=2) + "\n"
        if args.json
        else f"agent {answer['agent_id']}: credential revoked at {answer['revoked_at']}\n"
    )
    return 0


def _forget(sidecar: Sidecar, args: argparse.Namespace, out: TextIO) -> int:
    answer = sidecar.json("DELETE", f"/agents/{args.agent_id}")
    out.write(json.dumps(answer, indent=2) + "\n" if args.json else f"agent {args.agent_id}: forgotten\n")
    return 0


def _write(out: TextIO, data: bytes) -> None:
    out.write(data.decode("utf-8", errors="replace"))
    out.flush()


COMMANDS: dict[tuple[str, str], Callable[[Sidecar, argparse.Namespace, TextIO], int]] = {
    ("jobs", "list"): _list,
    ("jobs", "show"): _show,
    ("jobs", "log"): _log,
    ("jobs", "stop"): _stop,
    ("agents", "list"): _agents,
    ("agents", "drain"): _drain,
    ("agents", "maintenance"): _drain,
    ("agents", "undrain"): _drain,
    ("agents", "revoke"): _revoke,
    ("agents", "forget"): _forget,
}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
