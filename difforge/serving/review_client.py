"""A client of a running service's review queue (`difforge review ...`): list, show, approve and
reject held outputs over HTTP with an admin key (or from loopback, when the service has no keys).
"""

from __future__ import annotations

import os
from typing import Any

from difforge.core.errors import DifforgeError

KEY_ENV = "DIFFORGE_API_KEY"  # the admin key, when --key is not given


class ReviewClientError(DifforgeError):
    """The service answered with an error (the message is its `detail`), or could not be reached."""


class ReviewClient:
    """Args:
    url: the service, e.g. http://127.0.0.1:8000.
    key: an API key with the admin scope; default: $DIFFORGE_API_KEY, else none (loopback).
    timeout: seconds per call.
    """

    def __init__(self, url: str, key: str | None = None, timeout: float = 30.0):
        import httpx

        key = key if key is not None else os.environ.get(KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ReviewClientError(f"{self._http.base_url}: {e}") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if r.status_code == 404 and path == "/v1/admin/review":
                detail = "this service has no output filters (no review queue)"
            raise ReviewClientError(f"HTTP {r.status_code}: {detail}")
        return r

    def list(self, state: str = "pending") -> dict[str, Any]:
        return self._call("GET", "/v1/admin/review", params={"state": state}).json()

    def show(self, request_id: str) -> tuple[bytes, str]:
        """The held output's bytes and media type (PNG for one image, JSON for several)."""
        r = self._call("GET", f"/v1/admin/review/{request_id}")
        return r.content, r.headers.get("content-type", "")

    def decide(self, request_id: str, verdict: str, note: str | None = None) -> dict[str, Any]:
        body = {} if note is None else {"note": note}
        return self._call("POST", f"/v1/admin/review/{request_id}/{verdict}", json=body).json()

    def close(self) -> None:
        self._http.close()
