"""Named leases in the router DB: one holder at a time among the sidecar's replicas.

A lease expires by the database's own clock, so replicas whose clocks disagree still agree on who holds it.
That clock stepped back makes a lease look longer: its holder renews it as before (a renewal matches the
holder, never the expiry) and nobody else takes it early. Stepped forward, it makes a lease look expired
early: a standby may take it while its holder still leads, until the holder's next renewal is refused.

A holder may name earlier processes of its own (``successor_of``: a prefix of their holder names) whose
lease it takes over at once instead of waiting it out; the caller vouches that they are gone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from router_db.clock import db_now
from router_db.models import Lease


class Leases:
    """Take, renew, give up and look up leases; each call is one short transaction."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session] | None = None) -> None:
        self._engine = engine
        self._sessions = sessions if sessions is not None else sessionmaker(engine)

    def acquire(self, name: str, holder: str, ttl_seconds: float, *, successor_of: str | None = None) -> bool:
        """Take or renew lease ``name`` for ``ttl_seconds`` of the database's clock; True if held now.

        A compare-and-set: the UPDATE matches only a lease that is expired or already ours, and the
        INSERT of a missing lease loses to any concurrent one on the primary key. Two replicas racing
        therefore never both win, and a renewal after expiry succeeds only if nobody took over.
        ``successor_of``: a prefix of ``holder`` naming this replica's earlier processes, known gone:
        a lease one of them holds counts as ours (a restart resumes its term at once).
        """
        ours = Lease.holder == holder
        if successor_of is not None:
            if not successor_of or not holder.startswith(successor_of):
                raise ValueError("successor_of must be a non-empty prefix of the holder's own name")
            # substr, not LIKE: SQLite's LIKE ignores case, and a replica id's "_" is a LIKE wildcard.
            ours = ours | (func.substr(Lease.holder, 1, len(successor_of)) == successor_of)
        now, until = self._db_now(), self._db_now(ttl_seconds)
        with self._sessions() as session, session.begin():
            taken = session.execute(
                update(Lease)
                .where(Lease.name == name, ours | (Lease.expires_at <= now))
                .values(holder=holder, expires_at=until)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                return True
        try:
            with self._sessions() as session, session.begin():
                session.execute(insert(Lease).values(name=name, holder=holder, expires_at=until))
        except IntegrityError:
            return False  # the lease exists and is someone else's, or another replica inserted first
        return True

    def release(self, name: str, holder: str) -> bool:
        """Give lease ``name`` up if ``holder`` has it, so a standby takes over at once."""
        with self._sessions() as session, session.begin():
            gone = session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
            return gone.rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def holder(self, name: str) -> str | None:
        """Who holds lease ``name`` now by the database's clock; None when it is free or expired."""
        query = select(Lease.holder).where(Lease.name == name, Lease.expires_at > self._db_now())
        with self._sessions() as session:
            return session.scalars(query).one_or_none()

    def _db_now(self, plus_seconds: float = 0.0) -> ColumnElement[Any]:
        """The database's current time (plus an offset), as a SQL expression of its own clock: the
        router DB's one clock (:mod:`router_db.clock`)."""
        return db_now(self._engine.dialect.name, plus_seconds)
