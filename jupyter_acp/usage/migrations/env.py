"""Alembic's environment for the usage ledger: run by ``jupyter_acp.usage.migrate`` only.

``UsageLedger`` migrates its database when it connects, inside a transaction it has opened on
its own connection (which it passes in ``config.attributes["connection"]``) and that holds a
lock, so that two servers starting at once do not both create the tables. There is no
``alembic.ini`` and no offline (SQL script) mode: the configuration is built in code.
"""

from __future__ import annotations

from alembic import context

from jupyter_acp.usage.schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the ledger's migrations run through jupyter_acp.usage.migrate, which "
                       "passes an open connection in config.attributes['connection']")

context.configure(
    connection=connection,
    target_metadata=metadata,  # (for `alembic revision --autogenerate` when writing a new one)
    version_table=VERSION_TABLE,
    render_as_batch=True,  # SQLite cannot ALTER most things: autogenerate batch operations
)
# (inside the caller's transaction, this begins nothing: the whole upgrade commits or not at all)
with context.begin_transaction():
    context.run_migrations()
