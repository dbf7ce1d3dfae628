"""N `difforge serve` replicas on loopback behind a real haproxy (Debian's package), for tests and
trying the multi-replica setup on one machine.

    python deploy/loopback/replicas.py --model models/mnist-cond --replicas 2 --port 8080

haproxy health-checks each replica's GET /v2/health/ready every 250 ms (down after 2 misses) (a replica warming up or
draining after SIGTERM leaves the rotation), and re-sends a request whose connection failed or
came back empty to another replica (`retry-on conn-failure empty-response`, `option redispatch`):
a replica killed mid-request costs its clients a retry, not an error. A retried generation can run
twice (once on the dead replica); it returns the same image, since image i depends only on its
seed and settings. Each replica keeps its own audit hash chain (audit-<i>.sqlite3).

With `--state URL` (PostgreSQL, or a SQLite file for replicas on one machine) the replicas share
Idempotency-Key records and rate-limit buckets there (service config `state`): a retry that
lands on the other replica replays the stored response instead of computing it again.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HAPROXY = "/usr/sbin/haproxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(front: int, backends: list[int]) -> str:
    """An haproxy.cfg: round robin over the backends, readiness checks, retries on failure."""
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{port} check inter 250ms fall 2 rise 2"
        for i, port in enumerate(backends)
    )
    return f"""global
    maxconn 512

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request  # a request body must be buffered to be re-sent

frontend difforge
    bind 127.0.0.1:{front}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
{servers}
"""


def ready(port: int, path: str = "/v2/health/ready") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no replica ready on port {port} after {timeout:.0f} s")
        time.sleep(0.2)


@dataclass
class Replicas:
    """Started replicas and the haproxy in front of them; `stop()` ends them all."""

    front: int
    ports: list[int]
    folder: Path  # haproxy.cfg and replica-<i>.log
    service: dict = field(default_factory=dict)  # merged into each replica's service config
    servers: list[subprocess.Popen] = field(default_factory=list)
    proxy: subprocess.Popen | None = None

    def start_replica(self, i: int, model: str, env: dict | None = None) -> subprocess.Popen:
        # one audit hash chain per replica: two processes appending to one SQLite chain collide
        # on its sequence numbers (measured: 500s from `UNIQUE constraint failed: audit.seq`)
        config = self.folder / f"service-{i}.json"
        audit = {"audit_db": str(self.folder / f"audit-{i}.sqlite3")}
        config.write_text(json.dumps({**self.service, **audit}))
        cmd = [sys.executable, "-m", "difforge.cli", "serve", "--model", model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.ports[i]), "--config", str(config)]
        with open(self.folder / f"replica-{i}.log", "a") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if i < len(self.servers):
            self.servers[i] = proc
        else:
            self.servers.append(proc)
        return proc

    def stop(self) -> None:
        for p in [*self.servers, self.proxy]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def start(
    model: str, n: int, folder: Path, front: int | None = None, env=None, service=None
) -> Replicas:
    """Start n replicas of `model` and haproxy on `front`; return once haproxy answers ready.

    `service`: service config fields shared by every replica (e.g. {"state": {"url": ...}})."""
    reps = Replicas(front or free_port(), [free_port() for _ in range(n)], folder, service or {})
    try:
        for i in range(n):
            reps.start_replica(i, model, env)
        for port in reps.ports:
            wait_ready(port)
        cfg = folder / "haproxy.cfg"
        cfg.write_text(haproxy_config(reps.front, reps.ports))
        reps.proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)])
        wait_ready(reps.front, timeout=10)
    except BaseException:
        reps.stop()
        raise
    return reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--state", help="database URL for shared idempotency and rate limits")
    args = p.parse_args()
    folder = Path("/tmp/difforge-replicas")
    folder.mkdir(exist_ok=True)
    service = {"state": {"backend": "database", "url": args.state}} if args.state else None
    reps = start(args.model, args.replicas, folder, args.port, service=service)
    print(f"haproxy on http://127.0.0.1:{reps.front} -> replicas on {reps.ports}; Ctrl-C stops")
    try:
        reps.proxy.wait()
    except KeyboardInterrupt:
        pass
    finally:
        reps.stop()


if __name__ == "__main__":
    main()
