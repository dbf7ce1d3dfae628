"""Two `difforge serve` replicas behind a real haproxy on loopback (deploy/loopback/replicas.py):
under a steady load one replica drains on SIGTERM and exits cleanly, then (restarted) the other is
SIGKILLed; every request sent through haproxy gets its image, the one its seed defines. With
shared state (SQLite file, and the real PostgreSQL when set), every request carries an
Idempotency-Key: after a SIGKILL under load each key has exactly one stored answer, which any
later retry replays byte for byte."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.test_registry import registry_url  # noqa: F401 (fixture)
from tests.unit.test_eval_report import make_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
                       reason="haproxy is not installed (apt-get install haproxy)"),
]  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("replicas", ROOT / "deploy/loopback/replicas.py")
replicas = sys.modules["replicas"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replicas)
DRAIN_DEADLINE_S = 30.0


class Load:
    """`clients` threads sending one-image requests through haproxy, each with its own seed."""

    def __init__(self, port: int, clients: int = 3, keyed: bool = False):
        self.url = f"http://127.0.0.1:{port}/v1/generate"
        self.keyed, self.conflicts = keyed, 0  # keyed: Idempotency-Key seed-<seed>, 409 retried
        self.results: dict[int, tuple[int, bytes]] = {}
        self.stop = threading.Event()
        self.next_seed = iter(range(10**6))
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                with self.lock:
                    seed = next(self.next_seed)
                out = self._send(c, seed)
                with self.lock:
                    self.results[seed] = out

    def _send(self, c: httpx.Client, seed: int) -> tuple[int, bytes]:
        body = {"labels": [seed % 10], "seed": seed, "steps": 2}
        headers = {"Idempotency-Key": f"seed-{seed}"} if self.keyed else None
        while True:
            try:
                r = c.post(self.url, json=body, headers=headers)
            except httpx.HTTPError as e:
                return (-1, repr(e).encode())
            if r.status_code != 409 or not self.keyed:
                return (r.status_code, r.content)
            with self.lock:  # the first try still holds the key (its replica died): wait
                self.conflicts += 1
            time.sleep(float(r.headers.get("retry-after", "1")))

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            assert time.monotonic() < deadline, f"only {len(self.results)} answers"
            time.sleep(0.05)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_drain_and_kill_under_load_lose_no_request(tmp_path):
    model = str(make_tiny_model(tmp_path / "tiny"))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reps = replicas.start(model, 2, tmp_path, env=env)
    try:
        with Load(reps.front) as load:
            load.wait_for(10)
            drained = reps.servers[1]
            t0 = time.monotonic()
            drained.send_signal(signal.SIGTERM)  # uvicorn finishes in-flight requests, then exits
            # uvicorn drains, then re-raises the signal: exit status -SIGTERM, not a crash
            assert drained.wait(timeout=DRAIN_DEADLINE_S) in (0, -signal.SIGTERM)
            drain_s = time.monotonic() - t0
            log = (tmp_path / "replica-1.log").read_text()
            assert "Shutting down" in log and "Finished server process" in log, log[-2000:]
            load.wait_for(len(load.results) + 10)  # served by replica 0 alone meanwhile
            reps.start_replica(1, model, env)
            replicas.wait_ready(reps.ports[1])
            load.wait_for(len(load.results) + 10)
            reps.servers[0].kill()  # SIGKILL: connections drop mid-request
            load.wait_for(len(load.results) + 15)
        failed = {s: r for s, r in load.results.items() if r[0] != 200}
        assert not failed, {s: (c, b[:200]) for s, (c, b) in list(failed.items())[:5]}
        assert drain_s < DRAIN_DEADLINE_S
        # an answer is the image its seed defines, whichever replica (or retry) produced it
        with httpx.Client(timeout=60) as c:
            for seed in sorted(load.results)[:: max(1, len(load.results) // 5)]:
                body = {"labels": [seed % 10], "seed": seed, "steps": 2}
                again = c.post(f"http://127.0.0.1:{reps.ports[1]}/v1/generate", json=body)
                assert np.array_equal(pixels(again.content), pixels(load.results[seed][1]))
    finally:
        reps.stop()


def test_a_kill_with_shared_state_loses_and_duplicates_nothing(tmp_path, registry_url):  # noqa: F811
    model = str(make_tiny_model(tmp_path / "tiny"))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    state = {"backend": "database", "url": registry_url, "claim_lease_s": 2.0}
    reps = replicas.start(model, 2, tmp_path, env=env, service={"state": state})
    try:
        with Load(reps.front, keyed=True) as load:
            load.wait_for(10)
            reps.servers[0].kill()  # SIGKILL mid-request: its claims lapse after claim_lease_s
            load.wait_for(len(load.results) + 15)
        failed = {s: r for s, r in load.results.items() if r[0] != 200}
        assert not failed, {s: (c, b[:200]) for s, (c, b) in list(failed.items())[:5]}
        with httpx.Client(timeout=60) as c:
            for seed, (_, first) in sorted(load.results.items()):
                body = {"labels": [seed % 10], "seed": seed, "steps": 2}
                key = {"Idempotency-Key": f"seed-{seed}"}
                # through haproxy (now replica 1 alone), also for answers replica 0 stored
                again = c.post(f"http://127.0.0.1:{reps.front}/v1/generate", json=body, headers=key)
                assert again.status_code == 200, again.text
                assert again.headers["idempotent-replayed"] == "true"
                assert again.content == first  # one stored answer per key, the one sent
            for seed in sorted(load.results)[:: max(1, len(load.results) // 5)]:
                body = {"labels": [seed % 10], "seed": seed, "steps": 2}
                fresh = c.post(f"http://127.0.0.1:{reps.ports[1]}/v1/generate", json=body)
                assert np.array_equal(pixels(fresh.content), pixels(load.results[seed][1]))
    finally:
        reps.stop()
