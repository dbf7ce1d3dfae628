"""Hash chains for append-only audit logs: canonical JSON, the genesis link, the chain hash, and
a verifier that reports every broken row (not only the first).

Row n's hash covers row n's content and row n-1's hash, so editing a row breaks its own hash and
deleting or reordering rows breaks the links after it. Two formats are in use on disk and both
must keep verifying, so a `ChainFormat` says how a row is hashed:

    prev_key=None          hash_n = sha256(hash_(n-1) + canonical JSON of content_n)   (serving)
    prev_key="prev_hash"   hash_n = sha256(canonical JSON of {**content_n, prev_hash})  (registry)

Someone who can rewrite the whole chain can hide an edit from `verify` alone: publish the head
(the last hash) somewhere else to anchor it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

GENESIS = "0" * 64  # the "previous hash" of the first row


def canonical_json(value: Any, *, ascii_only: bool = False, allow_nan: bool = False) -> str:
    """One fixed text for a JSON value (sorted keys, no spaces), so its hash is reproducible.

    Args:
        value: any JSON-serialisable value.
        ascii_only: escape non-ASCII characters as \\uXXXX (json's `ensure_ascii`).
        allow_nan: write NaN/Infinity (not strict JSON) instead of raising ValueError.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=allow_nan
    )


def sha256_text(text: str) -> str:
    """Hex sha256 of `text` encoded as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ChainFormat:
    """How one log turns (previous hash, row content) into the row's hash."""

    prev_key: str | None = None  # None: prefix the previous hash; else hash it under this key
    ascii_only: bool = False  # canonical JSON escapes non-ASCII
    allow_nan: bool = False  # canonical JSON may hold NaN/Infinity

    def canonical(self, value: Any) -> str:
        """`canonical_json` with this format's options (also for JSON text stored in a row)."""
        return canonical_json(value, ascii_only=self.ascii_only, allow_nan=self.allow_nan)

    def hash(self, prev_hash: str, content: Mapping[str, Any]) -> str:
        """The chain hash of a row whose content columns are `content`."""
        if self.prev_key is None:
            return sha256_text(prev_hash + self.canonical(dict(content)))
        return sha256_text(self.canonical({**content, self.prev_key: prev_hash}))


@dataclass(frozen=True)
class Link:
    """One stored row as the verifier sees it."""

    seq: int  # 1, 2, 3, ... with no gaps
    prev_hash: str  # the previous row's hash, as recorded in this row
    hash: str  # this row's hash, as recorded
    content: Mapping[str, Any]  # the hashed columns, as stored
    label: str = ""  # shown in messages, e.g. the action ("register")


@dataclass(frozen=True)
class ChainProblem:
    """One way the chain does not hold at row `seq`."""

    seq: int
    kind: Literal["missing", "unlinked", "edited"]
    message: str


@dataclass(frozen=True)
class ChainReport:
    """The outcome of `verify`: every problem found, the number of rows and the head hash."""

    problems: tuple[ChainProblem, ...]
    rows: int
    head: str

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    links: Iterable[Link], fmt: ChainFormat, *, noun: str = "row", plural: str = "rows"
) -> ChainReport:
    """Walk rows in seq order and report every gap, broken link and edited row.

    Each row is checked on its own: its hash against its own recorded `prev_hash` (so an edit is
    blamed on the edited row only) and its `prev_hash` against the previous row's hash.

    Args:
        links: the rows, oldest first.
        fmt: how the rows were hashed.
        noun, plural: what a row is called in messages ("audit entry", "audit entries").
    """
    problems: list[ChainProblem] = []
    prev, expected_seq, count = GENESIS, 1, 0
    for link in links:
        count += 1
        if link.seq != expected_seq:
            text = f"{plural} {expected_seq}..{link.seq - 1} are missing"
            problems.append(ChainProblem(link.seq, "missing", text))
        if link.prev_hash != prev:
            text = f"{noun} {link.seq} does not link to {noun.split()[-1]} {link.seq - 1}"
            problems.append(ChainProblem(link.seq, "unlinked", text))
        digest = fmt.hash(link.prev_hash, link.content)
        if digest != link.hash:
            what = f"{noun} {link.seq}" + (f" ({link.label})" if link.label else "")
            text = (
                f"{what} was edited: its contents hash to {digest[:12]}..., "
                f"the chain recorded {link.hash[:12]}..."
            )
            problems.append(ChainProblem(link.seq, "edited", text))
        prev, expected_seq = link.hash, link.seq + 1
    return ChainReport(tuple(problems), count, prev)
