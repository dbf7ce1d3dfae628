"""Idempotency records and rate-limit buckets shared by every replica, in SQL tables.

The in-memory `IdempotencyStore` and `RateLimiter` serve one replica; `DatabaseIdempotency` and
`DatabaseRateLimiter` have the same methods and keep their state in two tables of the database
at `ServiceConfig.state.url` (or the registry's), so N replicas behind a load balancer act as one:

    serving_idempotency   (owner, key) -> body fingerprint, state running|done, claim token and
                          lease, the stored response (status, body bytes, media type, headers),
                          expiry
    serving_rate_buckets  key id -> tokens, stamp (a token bucket)

Every change is one atomic statement, correct under concurrent replicas on PostgreSQL (row locks)
and SQLite (one writer at a time):
- claim: `INSERT ... ON CONFLICT DO NOTHING`; if the row exists, a conditional `UPDATE` takes it
  over only when it is expired (done, older than `idempotency_ttl_s`) or abandoned (running, its
  lease not renewed for `claim_lease_s`: the replica running it died); otherwise the row decides:
  a different body -> idempotency_mismatch (422), still running -> idempotency_conflict (409 with
  Retry-After; the client retries and then gets the stored answer), done -> the stored response.
- complete / release / renew: `UPDATE`/`DELETE ... WHERE token = <this claim's token>`, so a
  replica whose abandoned claim was taken over can neither overwrite nor delete the new one.
- acquire: `INSERT ... ON CONFLICT DO UPDATE SET tokens = CASE ... RETURNING`, the refill, the
  take and the answer in one statement.

Times are the replicas' wall clocks (`time.time`): keep them in step (NTP); a skew of d seconds
moves leases and expiries by d, and a bucket's refill never runs backwards (the stamp only grows).
Bounds: at most `idempotency_entries` stored responses (oldest done rows pruned on each
completion) of at most `state.max_response_bytes` each (a larger one is not stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    create_engine,
    delete,
    event,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.serving.access import RateLimiter
from difforge.serving.config import ServiceConfig
from difforge.serving.idempotency import (
    IdempotencyConflict,
    IdempotencyStore,
    StoredResponse,
    body_fingerprint,
)

log = logging.getLogger("difforge.serving")

metadata = MetaData()
idempotency_table = Table(
    "serving_idempotency",
    metadata,
    Column("owner", String(64), primary_key=True),  # the API key id
    Column("key", String(128), primary_key=True),  # the Idempotency-Key header
    Column("fingerprint", String(64), nullable=False),  # body_fingerprint of the request body
    Column("token", String(32), nullable=False),  # this claim's id
    Column("state", String(8), nullable=False),  # "running" | "done"
    Column("created", Float, nullable=False, index=True),
    Column("lease_until", Float, nullable=False),  # running: abandoned after this
    Column("expires", Float, nullable=False),  # done: forgotten after this
    Column("status", Integer),  # the HTTP status of the stored answer (200, 202 held)
    Column("media_type", String(128)),
    Column("headers", Text),  # JSON object
    Column("body", LargeBinary),
)
buckets_table = Table(
    "serving_rate_buckets",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("stamp", Float, nullable=False),  # when tokens was computed
    Column("granted", Integer, nullable=False),  # 1 if the last acquire was granted
)
_INSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_DDL_LOCK = 7230452  # pg_advisory_xact_lock id: concurrent first opens must not race


def open_state_engine(url: str) -> Engine:
    """An engine on `url` with the two tables created (PostgreSQL or SQLite).

    Raises:
        InvalidArgumentError: another database, or one that cannot be reached.
    """
    try:
        backend = make_url(url).get_backend_name()
        if backend not in _INSERTS:
            raise InvalidArgumentError(
                f"state.url must be a PostgreSQL or SQLite database, got {backend}"
            )
        engine = create_engine(url)
    except InvalidArgumentError:
        raise
    except Exception as e:  # a malformed URL, a missing driver
        raise InvalidArgumentError(f"state.url: {e}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 30000")  # replicas take turns writing
            if engine.url.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode = WAL")
            cur.close()

    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_DDL_LOCK})")
            metadata.create_all(conn, checkfirst=True)
    except Exception as e:
        engine.dispose()
        raise InvalidArgumentError(f"state.url: cannot open the state database: {e}") from None
    return engine


class StateUnavailable(DifforgeError):
    """The shared-state database failed a statement (down, unreachable, its tables gone): the
    request is refused (503 with Retry-After) rather than run unprotected."""


class DatabaseIdempotency:
    """`IdempotencyStore`'s claim / complete / release over a shared table (module docstring)."""

    blocking = True  # its methods do I/O: the service calls them off the event loop

    def __init__(
        self,
        engine: Engine,
        *,
        max_entries: int = 1024,
        ttl_s: float = 3600.0,
        lease_s: float = 10.0,
        max_response_bytes: int = 4 << 20,
        clock: Callable[[], float] = time.time,
    ):
        self.engine, self.lease_s = engine, lease_s
        self._max, self._ttl, self._max_bytes, self._clock = (
            max_entries,
            ttl_s,
            max_response_bytes,
            clock,
        )
        self._insert = _INSERTS[engine.dialect.name]
        self._tokens: dict[tuple[str, str], str] = {}  # this replica's claims
        self._lock = threading.Lock()

    def _where(self, owner: str, key: str, token: str | None = None):
        t = idempotency_table.c
        cond = and_(t.owner == owner, t.key == key)
        return cond if token is None else and_(cond, t.token == token)

    def claim(self, owner: str, key: str, body: bytes) -> StoredResponse | None:
        """Claim `key` for a new request (None), or return the stored response of a retry.

        Raises:
            IdempotencyConflict: "idempotency_conflict" while the first request runs (on any
                replica), "idempotency_mismatch" for a different body.
        """
        fp, token = body_fingerprint(body), uuid.uuid4().hex
        for _ in range(3):  # a row deleted between our statements: try again
            now, t = self._clock(), idempotency_table.c
            fresh = dict(
                fingerprint=fp, token=token, state="running", created=now,
                lease_until=now + self.lease_s, expires=now + self._ttl,
                status=None, media_type=None, headers=None, body=None,
            )  # fmt: skip
            with self.engine.begin() as conn:
                ins = self._insert(idempotency_table).values(owner=owner, key=key, **fresh)
                # (rowcount is -1 for this under psycopg 3: ask for the row instead)
                ins = ins.on_conflict_do_nothing().returning(t.token)
                taken = conn.execute(ins).first() is not None
                if not taken:  # expired or abandoned: ours now
                    stale = or_(
                        and_(t.state == "done", t.expires < now),
                        and_(t.state == "running", t.lease_until < now),
                    )
                    upd = update(idempotency_table).where(self._where(owner, key), stale)
                    taken = conn.execute(upd.values(**fresh)).rowcount == 1
                row = None
                if not taken:
                    cols = (t.fingerprint, t.state, t.status, t.body, t.media_type, t.headers)
                    row = conn.execute(select(*cols).where(self._where(owner, key))).first()
            if taken:
                with self._lock:
                    self._tokens[(owner, key)] = token
                return None
            if row is not None:
                return _decide(row, fp)
        raise IdempotencyConflict(
            "idempotency_conflict", "a request with this Idempotency-Key is in progress"
        )

    def renew(self, owner: str, key: str) -> bool:
        """Extend this replica's claim on `key`; False if it is no longer ours."""
        token = self._tokens.get((owner, key))
        if token is None:
            return False
        lease = self._clock() + self.lease_s
        stmt = update(idempotency_table).where(self._where(owner, key, token))
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(lease_until=lease)).rowcount == 1

    def complete(self, owner: str, key: str, response: StoredResponse) -> None:
        """Store the response of this replica's claim (if still ours), then prune."""
        with self._lock:
            token = self._tokens.pop((owner, key), None)
        if token is None:
            return
        if len(response.body) > self._max_bytes:  # answered, not stored: a retry recomputes
            self._delete(owner, key, token)
            return
        now = self._clock()
        stmt = update(idempotency_table).where(self._where(owner, key, token))
        stored = dict(
            state="done", expires=now + self._ttl, body=response.body, status=response.status,
            media_type=response.media_type, headers=json.dumps(response.headers),
        )  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(stmt.values(**stored))
            self._prune(conn, now)

    def release(self, owner: str, key: str) -> None:
        """Forget this replica's claim whose request failed, so that a retry runs again."""
        with self._lock:
            token = self._tokens.pop((owner, key), None)
        if token is not None:
            self._delete(owner, key, token)

    def _delete(self, owner: str, key: str, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(idempotency_table).where(self._where(owner, key, token)))

    def _prune(self, conn, now: float) -> None:
        t = idempotency_table.c
        done = t.state == "done"
        conn.execute(delete(idempotency_table).where(done, t.expires < now))
        # the (max+1)-th newest stored response and everything older goes
        cutoff = select(t.created).where(done).order_by(t.created.desc()).offset(self._max)
        oldest_kept = conn.execute(cutoff.limit(1)).scalar()
        if oldest_kept is not None:
            conn.execute(delete(idempotency_table).where(done, t.created <= oldest_kept))


def _decide(row, fingerprint: str) -> StoredResponse:
    """The answer for an existing claim that is not ours: replay, or why not."""
    if row.fingerprint != fingerprint:
        raise IdempotencyConflict(
            "idempotency_mismatch", "Idempotency-Key was already used with a different request body"
        )
    if row.state != "done":
        raise IdempotencyConflict(
            "idempotency_conflict", "a request with this Idempotency-Key is in progress"
        )
    headers = json.loads(row.headers or "{}")
    return StoredResponse(bytes(row.body), row.media_type, headers, row.status or 200)


class DatabaseRateLimiter(RateLimiter):
    """`RateLimiter`'s token buckets (same limits, same answers) in a shared table: one bucket
    per key id for all replicas together."""

    blocking = True

    def __init__(
        self, config: ServiceConfig, engine: Engine, clock: Callable[[], float] = time.time
    ):
        super().__init__(config, clock=clock)
        self.engine = engine
        self._insert = _INSERTS[engine.dialect.name]

    def acquire(self, key_id: str, cost: float = 1.0) -> float | None:
        """Take `cost` tokens; None if granted, else seconds until they will be there."""
        limit = self.limit_for(key_id)
        if limit is None:
            return None
        now, burst, b = self._clock(), float(limit.burst), buckets_table.c
        elapsed = case((literal(now) > b.stamp, literal(now) - b.stamp), else_=0.0)
        refilled = b.tokens + elapsed * limit.per_second
        have = case((refilled < burst, refilled), else_=burst)  # min(burst, refilled)
        ok = have >= cost
        stmt = (
            self._insert(buckets_table)
            .values(key_id=key_id, tokens=burst - cost, stamp=now, granted=int(burst >= cost))
            .on_conflict_do_update(
                index_elements=[b.key_id],
                set_={
                    "tokens": case((ok, have - cost), else_=have),
                    "stamp": case((b.stamp > now, b.stamp), else_=now),
                    "granted": case((ok, 1), else_=0),
                },
            )
            .returning(b.tokens, b.granted)
        )
        with self.engine.begin() as conn:
            tokens, granted = conn.execute(stmt).one()
        return None if granted else (cost - tokens) / limit.per_second

    def refund(self, key_id: str, cost: float = 1.0) -> None:
        """Give back tokens taken by `acquire` for a request refused before any work."""
        limit = self.limit_for(key_id)
        if limit is None:
            return
        b, burst = buckets_table.c, float(limit.burst)
        back = case((b.tokens + cost < burst, b.tokens + cost), else_=burst)
        with self.engine.begin() as conn:
            conn.execute(update(buckets_table).where(b.key_id == key_id).values(tokens=back))


class SharedState:
    """The service's rate limiter and idempotency store, in memory or in a database.

    Args:
        config: the service config (its `state`, rate limits, idempotency bounds).
        registry_url: the registry the service follows, if any (the "auto" and default URL).
    """

    def __init__(self, config: ServiceConfig, registry_url: str | None = None):
        self.url = state_url(config, registry_url)
        self.engine: Engine | None = None
        if self.url is None:
            self.limiter = RateLimiter(config)
            self.idempotency = IdempotencyStore(
                config.idempotency_entries, config.idempotency_ttl_s
            )
            return
        self.engine = open_state_engine(self.url)
        self.limiter = DatabaseRateLimiter(config, self.engine)
        self.idempotency = DatabaseIdempotency(
            self.engine,
            max_entries=config.idempotency_entries,
            ttl_s=config.idempotency_ttl_s,
            lease_s=config.state.claim_lease_s,
            max_response_bytes=config.state.max_response_bytes,
        )

    @property
    def backend(self) -> str:
        return "memory" if self.engine is None else "database"

    @staticmethod
    async def call(fn, *args):
        """Call a limiter or store method; a database-backed one runs on a worker thread.

        Raises:
            StateUnavailable: the database failed (IdempotencyConflict passes through).
        """
        if not getattr(getattr(fn, "__self__", None), "blocking", False):
            return fn(*args)
        try:
            return await asyncio.to_thread(fn, *args)
        except SQLAlchemyError as e:
            log.warning("shared state: %s", e)
            msg = "the shared state database is unavailable; retry shortly"
            raise StateUnavailable(msg) from None

    @contextlib.asynccontextmanager
    async def holding(self, owner: str, key: str) -> AsyncIterator[None]:
        """While the body runs, renew the claim on `key` (database claims only)."""
        store = self.idempotency
        if not isinstance(store, DatabaseIdempotency):
            yield
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(store.lease_s / 3)
                try:
                    await asyncio.to_thread(store.renew, owner, key)
                except Exception as e:  # the database is away: the claim may lapse
                    log.warning("renewing the Idempotency-Key claim failed: %s", e)

        task = asyncio.create_task(renew(), name="difforge-idempotency-lease")
        try:
            yield
        finally:
            task.cancel()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def state_url(config: ServiceConfig, registry_url: str | None = None) -> str | None:
    """The database URL the shared state lives in, or None for memory (see config.StateConfig).

    Raises:
        InvalidArgumentError: backend "database" with no URL to use.
    """
    state = config.state
    if state.backend == "memory":
        return None
    if state.url is not None:
        return state.url
    if state.backend == "database":
        if registry_url is None:
            raise InvalidArgumentError(
                'state.backend "database" needs state.url (or serve --registry, whose database '
                "is then used)"
            )
        return registry_url
    pg = registry_url is not None and registry_url.startswith("postgresql")
    return registry_url if pg else None  # "auto"
