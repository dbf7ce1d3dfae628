"""Following a PostgreSQL registry at once: LISTEN for its change notifications.

Every registry change to a model is announced with `pg_notify('difforge_registry', <model name>)`
inside its transaction (difforge.registry.audit), so PostgreSQL delivers it to every listener the
moment it commits. A service following a PostgreSQL registry (`registry.notify`, on by default)
holds one extra connection that LISTENs on that channel from a daemon thread and runs its
`sync` as soon as its model's name arrives. Polling every `poll_s` stays on as the fallback: a
notification missed while the listening connection was down (it reconnects every few seconds) is
picked up by the next poll. SQLite has no notifications: there polling is the only path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from sqlalchemy.engine import make_url

from difforge.registry.audit import NOTIFY_CHANNEL

log = logging.getLogger("difforge.serving")

RECONNECT_S = 2.0  # wait before reopening a lost listening connection
_WAKE_S = 0.5  # how often the listening thread checks that it should stop


def notifies(url: str) -> bool:
    """Whether a registry at `url` sends change notifications (PostgreSQL does)."""
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except Exception:
        return False


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (query options such as search_path kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _listen(conninfo: str, name: str, wake: Callable[[], None], stop: threading.Event) -> None:
    """Until `stop`: LISTEN on a connection of its own, call `wake()` for each notice naming
    `name`, reconnect after a failure."""
    import psycopg

    if tuple(int(x) for x in psycopg.__version__.split(".")[:2]) < (3, 2):  # notifies(timeout=)
        log.warning("registry notifications need psycopg >= 3.2: following by polling only")
        return
    while not stop.is_set():
        try:
            app = f"difforge-listen:{name}"[:63]  # how operators (and tests) spot it
            with psycopg.connect(conninfo, autocommit=True, application_name=app) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                wake()  # (re)connected: a change may have been missed meanwhile
                while not stop.is_set():
                    for notice in conn.notifies(timeout=_WAKE_S):
                        if notice.payload == name:
                            wake()
        except Exception as e:  # the server went away: polling covers the gap
            log.warning("registry notifications: %s; reconnecting in %.0f s", e, RECONNECT_S)
            stop.wait(RECONNECT_S)


async def follow_notifications(url: str, name: str, on_change: Callable[[], Awaitable]) -> None:
    """Run `on_change()` whenever the registry at `url` announces a change to model `name`;
    runs until cancelled. Notices that arrive while `on_change` runs are folded into one more
    call after it."""
    loop = asyncio.get_running_loop()
    changed, stop = asyncio.Event(), threading.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(changed.set)

    thread = threading.Thread(
        target=_listen, args=(libpq_url(url), name, wake, stop), daemon=True,
        name="difforge-registry-listen",
    )  # fmt: skip
    thread.start()
    try:
        while True:
            await changed.wait()
            changed.clear()
            try:
                await on_change()
            except Exception as e:  # as a failed poll: logged, the next notice or poll retries
                log.warning("registry %s: sync after a notification failed: %s", name, e)
    finally:
        stop.set()
        with contextlib.suppress(RuntimeError):
            await asyncio.to_thread(thread.join, 2 * _WAKE_S)
