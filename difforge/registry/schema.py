"""The registry's tables (SQLAlchemy Core) and how a database is opened and locked for writing.

    model_versions      one immutable row per (name, version): hashes, config, provenance, card
    evaluation_reports  reports attached to a version (raw JSON + the summary the gates read)
    aliases             current (name, alias) -> version, with a traffic percent for canaries
    audit_log           append-only, hash-chained record of every change
    registry_meta       schema version, and the row every writer locks

Writers are serialised: on SQLite every write transaction is BEGIN IMMEDIATE (one writer at a
time, readers continue under WAL); elsewhere (PostgreSQL) it starts with SELECT ... FOR UPDATE
on the registry_meta lock row. Serialising all writes, not just one model's, keeps the single
audit chain linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)

from difforge.registry.errors import RegistryError

SCHEMA_VERSION = "1"
LOCK_KEY = "write_lock"

metadata = MetaData()

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("weights_sha256", String(64), nullable=False),
    Column("config_sha256", String(64), nullable=False),
    Column("files", Text, nullable=False),  # JSON {file name: sha256}
    Column("config", Text, nullable=False),  # config.json as stored
    Column("dataset_hash", String(128)),
    Column("code_version", String(128)),
    Column("training_config", Text),  # JSON or null
    Column("training_metrics", Text, nullable=False),  # JSON
    Column("card", Text, nullable=False),
    Column("source", Text),  # the folder it was registered from
    Column("created_at", String(40), nullable=False),
    Column("created_by", String(128), nullable=False),
    UniqueConstraint("name", "version"),
    UniqueConstraint("name", "weights_sha256"),
)

evaluation_reports = Table(
    "evaluation_reports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("sha256", String(64), nullable=False),  # of the canonical report JSON
    Column("report", Text, nullable=False),
    Column("source", Text),
    Column("created_at", String(40), nullable=False),
    UniqueConstraint("version_id", "sha256"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("alias", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("percent", Float),  # canary traffic share 0-100; null for other aliases
    Column("updated_at", String(40), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # 1, 2, 3, ... no gaps
    Column("at", String(40), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("name", String(128)),
    Column("version", Integer),
    Column("details", Text, nullable=False),  # canonical JSON, hashed as stored
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("hash", String(64), nullable=False, unique=True),
)

registry_meta = Table(
    "registry_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{op.lower()} BEFORE {op} ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    for op in ("UPDATE", "DELETE")
]
_PG_TRIGGERS = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$ LANGUAGE plpgsql",
    "CREATE OR REPLACE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
]


def _sqlite_setup(engine: Engine, lock_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite's is DEFERRED)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(lock_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys = ON")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("difforge_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def open_engine(url: str, lock_timeout_s: float = 60.0) -> Engine:
    """An engine for `url` with the registry's locking set up, and the schema created."""
    is_sqlite = url.startswith("sqlite")
    connect_args = {"timeout": lock_timeout_s} if is_sqlite else {}
    engine = create_engine(url, connect_args=connect_args)
    if is_sqlite:
        _sqlite_setup(engine, lock_timeout_s)
    _create_schema(engine)
    return engine


def _schema_version(conn: Connection) -> str | None:
    if not inspect(conn).has_table(registry_meta.name):
        return None
    key = registry_meta.c.key
    return conn.scalar(select(registry_meta.c.value).where(key == "schema_version"))


def _create_schema(engine: Engine) -> None:
    """Create the tables, triggers and meta rows, unless an existing registry already has them."""
    with read_transaction(engine) as conn:
        found = _schema_version(conn)
    if found == SCHEMA_VERSION:
        return  # the common case: no DDL, no lock
    if found is not None:
        raise RegistryError(
            f"this registry has schema version {found}; this difforge reads {SCHEMA_VERSION}"
        )
    with write_transaction(engine, lock=False) as conn:
        if engine.dialect.name == "postgresql":  # concurrent first opens must not race
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7230451)")
        metadata.create_all(conn)
        triggers = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _PG_TRIGGERS}
        for ddl in triggers.get(engine.dialect.name, []):
            conn.exec_driver_sql(ddl)
        have = set(conn.scalars(select(registry_meta.c.key)))
        for key, value in (("schema_version", SCHEMA_VERSION), (LOCK_KEY, "")):
            if key not in have:
                conn.execute(registry_meta.insert().values(key=key, value=value))


@contextmanager
def write_transaction(engine: Engine, *, lock: bool = True) -> Iterator[Connection]:
    """A transaction that holds the registry's write lock until it commits or rolls back."""
    with engine.connect() as conn:
        conn.execution_options(difforge_write=True)
        with conn.begin():
            if lock and engine.dialect.name != "sqlite":  # SQLite: BEGIN IMMEDIATE locked it
                conn.execute(
                    select(registry_meta.c.key)
                    .where(registry_meta.c.key == LOCK_KEY)
                    .with_for_update()
                )
            yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot for all its statements, never blocking
    writers (SQLite under WAL; PostgreSQL at REPEATABLE READ). PostgreSQL's default, READ
    COMMITTED, gives each statement its own snapshot: `Registry.resolve` could then read the
    aliases before a promotion committed and the revision after it, and a service following the
    registry would record the new revision while serving the old version, never to catch up."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn
