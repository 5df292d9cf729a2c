"""``python -m reconciler run|once|check-config|db upgrade|current|prune --config reconciler.toml``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from servicekit.extras import require

SIDECAR_MODULES = ("aiohttp", "tenacity", "sqlalchemy", "alembic", "psycopg", "prometheus_client")
require("sidecar", *SIDECAR_MODULES, command="agentic-reconciler")  # before the imports that need them

from reconciler.airflow.checks import connections  # noqa: E402
from reconciler.config import ConfigError, ReconcilerConfig, Secrets, load_config, load_secrets  # noqa: E402
from reconciler.core.leadership import holder_id  # noqa: E402
from reconciler.core.retention import parse_age  # noqa: E402
from reconciler.service import build, serve  # noqa: E402
from router_db import RouterDB, schema  # noqa: E402
from servicekit import logs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the sidecar: poll loop and HTTP API"),
        ("once", "run one reconcile cycle and print what it did"),
        ("check-config", "validate the configuration file and secrets, then exit"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument(
            "--config", default="config/reconciler.toml", help="TOML file (default: %(default)s)"
        )
        cmd.add_argument("--log-level", default="INFO")
        if name == "once":
            cmd.add_argument("--dry-run", action="store_true", help="decide but change nothing")
        if name == "check-config":
            cmd.add_argument(
                "--connect",
                action="store_true",
                help="also reach Airflow, the router DB and every agent, configured or registered",
            )
    db = sub.add_parser(
        "db", help="router DB: upgrade its schema, show its revision, or prune jobs that ended long ago"
    )
    db.add_argument("action", choices=["upgrade", "current", "prune"])
    db.add_argument("--older-than", help="prune: jobs that ended longer ago than this, e.g. 30d, 12h")
    db.add_argument("--dry-run", action="store_true", help="prune: count, delete nothing")
    db.add_argument("--config", default="config/reconciler.toml", help="TOML file (default: %(default)s)")
    db.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        config = load_config(args.config)
        secrets = load_secrets(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        backend = config.router_db.url.split(":", 1)[0]
        print(f"{args.config}: ok ({len(config.agents)} agent(s), router DB {backend})")
        if not args.connect:
            return 0
        checks = asyncio.run(connections(config, secrets))
        for check in checks:
            print(check.line())
        return 0 if all(check.ok for check in checks) else 1
    if args.command == "db" and args.action == "prune":
        return _prune(config, args.older_than, dry_run=args.dry_run)
    try:
        if args.command == "db":
            return _db(config, args.action)
        if args.command == "once":
            return asyncio.run(_once(config, secrets, dry_run=args.dry_run))
        asyncio.run(serve(config, secrets))
    except schema.SchemaRefused as exc:
        # Exit 2 like a configuration that does not load: restarting cannot help, an operator must act.
        print(f"router DB schema error: {exc.line(args.config)}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found only at start: e.g. a [leader] replica_id a live process holds
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:
        print("stopped at once by a second signal; pending stops resume at the next start", file=sys.stderr)
        return 1
    return 0


def _prune(config: ReconcilerConfig, older_than: str | None, *, dry_run: bool) -> int:
    """Delete jobs that ended before now - ``older_than``, with their audit rows (2: a bad age)."""
    try:
        if older_than is None:
            raise ValueError("db prune needs --older-than, e.g. --older-than 30d")
        age = parse_age(older_than)
    except ValueError as exc:
        print(f"db prune: {exc}", file=sys.stderr)
        return 2
    db = RouterDB(config.router_db.url)
    try:
        before = db.now() - age  # the router DB's clock: the one updated_at was written with
        count = db.prune_finished(before, dry_run=dry_run)
    finally:
        db.dispose()
    verb = "would delete" if dry_run else "deleted"
    moment = before.isoformat(timespec="seconds")
    print(f"{verb} {count} job(s) that ended before {moment}, with their audit rows")
    return 0


def _db(config: ReconcilerConfig, action: str) -> int:
    """``upgrade``: migrate the router DB (before a rollout: the sidecar migrates at start only with
    ``[router_db] upgrade_on_start``); ``current``: its revision, changing nothing."""
    db = RouterDB(config.router_db.url)
    try:
        if action == "upgrade":
            db.create_schema()
        print(f"router DB at revision {schema.current(db.engine)} (this version: {schema.head()})")
        return 0
    finally:
        db.dispose()


async def _once(config: ReconcilerConfig, secrets: Secrets, *, dry_run: bool) -> int:
    parts = build(config, secrets, dry_run=dry_run)
    holder = holder_id()
    lease = config.leader.lease_name
    try:
        # A cycle that acts must not run beside a live leader: take the lease for it, or refuse.
        if not dry_run and not await asyncio.to_thread(
            parts.db.acquire_lease, lease, holder, config.leader.lease_seconds
        ):
            leader = await asyncio.to_thread(parts.db.lease_holder, lease)
            print(f"refusing to act: replica {leader} leads; use --dry-run to look", file=sys.stderr)
            return 3
        try:
            report = await parts.loop.cycle(dry_run=dry_run)
            if not dry_run:
                await parts.dispatcher.finish(60.0)
        finally:
            if not dry_run:
                await asyncio.to_thread(parts.db.release_lease, lease, holder)
    finally:
        await parts.close()
    for job, stop in report.stops:
        print(
            json.dumps(
                {
                    "action": "stop" if not dry_run else "would_stop",
                    "job_id": job.job_id,
                    "dag_id": job.key.dag_id,
                    "task_id": job.key.task_id,
                    "run_id": job.key.run_id,
                    "map_index": job.key.map_index,
                    "try_number": job.key.try_number,
                    "kind": str(stop.kind),
                    "final_status": str(stop.final_status),
                    "reason": stop.reason,
                }
            )
        )
    print(
        json.dumps(
            {
                "result": report.result,
                "active_jobs": report.active,
                "stops": len(report.stops),
                "unconfirmed": report.unconfirmed,
                "dry_run": dry_run,
            }
        )
    )
    return 0 if report.result == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
