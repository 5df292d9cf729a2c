"""Alembic migrations of the router database; applied by :meth:`router_db.RouterDB.create_schema`."""
