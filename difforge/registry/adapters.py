"""LoRA adapters in the registry: each adapter is a version tied to one base model version.

    push_adapter(reg, "runs/thick", "mnist-cond", "production")  # -> AdapterRegistration
    list_adapters(reg, "mnist-cond", 1)                           # every adapter version of v1
    current_adapters(reg, "mnist-cond", 1)                        # the latest of each name
    attach_registered(reg, model, "mnist-cond", 1)                # serve them beside the base

Rules:
- An adapter records the sha256 of the base it was trained on (difforge.pipeline.adapters); a
  push is refused unless that is the sha256 of the named base version, and the adapter must
  load onto that base (its tensors fit the net), as `register` proves a model folder loads.
- Versions count 1, 2, ... per (base version, adapter name); pushing the same file again under
  the same name is the existing version; the same file under another name is a conflict.
- A base version's adapters are its own: a canary of another version carries the adapters pushed
  for it (an adapter of v1 cannot apply to v2: its base sha256 differs).
- Blobs live in the registry's content-addressed store and are re-hashed on every load; a
  damaged one is refused and the refusal is an audit entry. Each push is an audit entry
  ("adapter_register") whose digest of the row lets `Registry.verify` find later edits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, select

from difforge.common.hashchain import canonical_json, sha256_text
from difforge.core.errors import InvalidArgumentError
from difforge.pipeline.adapters import (
    ADAPTER_FILE,
    Adapter,
    AdapterMismatch,
    attach_adapter,
    load_adapter,
)
from difforge.registry import audit
from difforge.registry.errors import ArtifactIntegrityError, ConflictError, NotFoundError
from difforge.registry.naming import check_name
from difforge.registry.schema import (
    adapter_versions,
    model_versions,
    read_transaction,
    write_transaction,
)
from difforge.registry.store import ArtifactStore

if TYPE_CHECKING:
    from difforge.pipeline import Model
    from difforge.registry.registry import Registry

ADAPTER_ACTION = "adapter_register"
_CARD_FILE = "README.md"
_IMMUTABLE = ("base_id", "name", "version", "sha256", "files", "meta", "scale", "card", "source")


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter version and the base version it belongs to."""

    base_name: str
    base_version: int
    base_sha256: str
    name: str
    version: int
    sha256: str  # of adapter.safetensors
    files: dict[str, str]  # file name -> sha256 of the stored blob
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    training: dict[str, Any]
    scale: float  # what serving applies it at
    card: str
    source: str | None
    created_at: str
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.base_name}:v{self.base_version}/{self.name}:v{self.version}"

    def to_dict(self, *, card: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "card"}
        d["target_modules"] = list(self.target_modules)
        if card:
            d["card"] = self.card
        return d


@dataclass(frozen=True)
class AdapterRegistration:
    """What `push_adapter` did: the adapter version and whether it is new."""

    info: AdapterInfo
    created: bool


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not -1e3 < scale < 1e3:
        raise InvalidArgumentError(
            f"adapter scale must be a number in (-1000, 1000), got {scale!r}"
        )
    return float(scale)


def _base_row(conn: Connection, name: str, version: int):
    row = conn.execute(
        select(model_versions).where(
            model_versions.c.name == name, model_versions.c.version == version
        )
    ).first()
    if row is None:
        raise NotFoundError(f"{name} has no version {version}")
    return row


def push_adapter(
    reg: Registry,
    folder: str | Path,
    base: str,
    base_ref: int | str = "latest",
    *,
    name: str | None = None,
    scale: float = 1.0,
) -> AdapterRegistration:
    """Store an adapter folder (`difforge train-lora`'s output) as a version of base `base_ref`.

    Args:
        reg: the registry.
        folder: the adapter folder (adapter.safetensors, README.md).
        base, base_ref: the base model version (a number, "latest" or an alias).
        name: the name requests use; default the adapter's own.
        scale: the scale serving applies it at (default 1).

    Raises:
        AdapterMismatch: the adapter's recorded base sha256 is not that base version's.
        ConflictError: the same adapter file is registered under another name of that base.
    """
    folder = Path(folder)
    adapter = load_adapter(folder)  # the format, metadata and safetensors are checked here
    name, scale = check_name(name or adapter.name), _check_scale(scale)
    info = reg.get(base, base_ref)
    if adapter.base_sha256 != info.weights_sha256:
        raise AdapterMismatch(
            f"adapter {adapter.name!r} was trained on base sha256 {adapter.base_sha256}; "
            f"{info.ref} has sha256 {info.weights_sha256}: refusing to push it there"
        )
    attach_adapter(reg.load_version(base, info.version), adapter)  # proves its tensors fit
    files = {ADAPTER_FILE: adapter.sha256}
    card = (folder / _CARD_FILE).read_text() if (folder / _CARD_FILE).is_file() else ""
    if card:
        files[_CARD_FILE] = reg.store.put_file(folder / _CARD_FILE)
    if reg.store.put_file(folder / ADAPTER_FILE, adapter.sha256) != adapter.sha256:
        raise InvalidArgumentError(f"{folder / ADAPTER_FILE} changed while it was being pushed")
    meta = {
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": list(adapter.target_modules),
        "training": adapter.training,
    }
    row = {
        "name": name,
        "sha256": adapter.sha256,
        "files": canonical_json(files),
        "meta": canonical_json(meta),
        "scale": scale,
        "card": card,
        "source": str(folder.resolve()),
        "created_by": reg.actor,
    }
    with write_transaction(reg.engine) as conn:
        base_row = _base_row(conn, info.name, info.version)
        version, created = _insert(reg, conn, base_row, row)
    found = [a for a in list_adapters(reg, base, info.version) if a.name == name]
    return AdapterRegistration(next(a for a in found if a.version == version), created)


def _insert(reg: Registry, conn: Connection, base_row, row: dict[str, Any]) -> tuple[int, bool]:
    t = adapter_versions.c
    same = conn.execute(
        select(adapter_versions).where(t.base_id == base_row.id, t.sha256 == row["sha256"])
    ).first()
    if same is not None:
        if same.name != row["name"]:
            raise ConflictError(
                f"this adapter is already {base_row.name}:v{base_row.version}/{same.name}:"
                f"v{same.version}; push it under that name"
            )
        return same.version, False
    last = conn.scalar(
        select(func.max(t.version)).where(t.base_id == base_row.id, t.name == row["name"])
    )
    row = {**row, "base_id": base_row.id, "version": (last or 0) + 1, "created_at": audit.now()}
    conn.execute(adapter_versions.insert().values(**row))
    audit.append(
        conn,
        ADAPTER_ACTION,
        actor=reg.actor,
        name=base_row.name,
        version=base_row.version,
        details={
            "adapter": row["name"],
            "adapter_version": row["version"],
            "sha256": row["sha256"],
            "base_sha256": base_row.weights_sha256,
            "files": json.loads(row["files"]),
            "scale": row["scale"],
            "row_sha256": _digest(row),
        },
    )
    return row["version"], True


def _digest(row: Any) -> str:
    return sha256_text(canonical_json({k: row[k] for k in _IMMUTABLE}))


def _info(row, base_row) -> AdapterInfo:
    meta = json.loads(row.meta)
    return AdapterInfo(
        base_row.name,
        base_row.version,
        base_row.weights_sha256,
        row.name,
        row.version,
        row.sha256,
        json.loads(row.files),
        int(meta["rank"]),
        float(meta["alpha"]),
        tuple(meta["target_modules"]),
        meta.get("training", {}),
        float(row.scale),
        row.card,
        row.source,
        row.created_at,
        row.created_by,
    )


def list_adapters(reg: Registry, base: str, base_ref: int | str | None = None) -> list[AdapterInfo]:
    """Every adapter version of `base` (all its versions, or the one `base_ref` names), in order
    of base version, name and adapter version."""
    versions = (
        [v.version for v in reg.list_versions(base)]
        if base_ref is None
        else [reg.get(base, base_ref).version]
    )
    if not versions:
        raise NotFoundError(f"no model named {base!r} in the registry")
    out = []
    with read_transaction(reg.engine) as conn:
        for number in versions:
            base_row = _base_row(conn, base, number)
            rows = conn.execute(
                select(adapter_versions)
                .where(adapter_versions.c.base_id == base_row.id)
                .order_by(adapter_versions.c.name, adapter_versions.c.version)
            ).all()
            out += [_info(r, base_row) for r in rows]
    return out


def current_adapters(reg: Registry, base: str, base_ref: int | str) -> list[AdapterInfo]:
    """The latest version of each adapter name of one base version (what serving attaches)."""
    latest: dict[str, AdapterInfo] = {}
    for a in list_adapters(reg, base, base_ref):
        latest[a.name] = a  # ordered by version within a name
    return list(latest.values())


def load_registered(reg: Registry, info: AdapterInfo) -> Adapter:
    """An adapter version from the store, after re-hashing each of its blobs.

    Raises:
        ArtifactIntegrityError: a blob is missing or modified (the refusal is audited).
    """
    bad = {f: p.describe() for f, sha in info.files.items() if (p := reg.store.check(sha))}
    if not bad:
        adapter = load_adapter(reg.store.checkout(info.files, f"adapter-{info.sha256}"))
        if adapter.sha256 == info.sha256:
            return adapter
        bad = {ADAPTER_FILE: "changed while it was being loaded"}
    with write_transaction(reg.engine) as conn:
        details = {"adapter": info.name, "adapter_version": info.version, "files": bad}
        audit.append(
            conn,
            "integrity_failure",
            actor=reg.actor,
            name=info.base_name,
            version=info.base_version,
            details=details,
        )
    listed = "; ".join(f"{f}: {p}" for f, p in bad.items())
    raise ArtifactIntegrityError(
        f"refusing to load adapter {info.ref}: stored artifacts failed their sha256 check "
        f"({listed}); recorded in the audit log; push the original folder again to repair them"
    )


def attach_registered(reg: Registry, model: Model, base: str, base_version: int) -> list[str]:
    """Attach to `model` (registry version `base_version` of `base`) the latest version of each
    of its registered adapters that it does not already hold at that sha256 and scale.

    Returns:
        The names attached now.
    """
    attached = []
    for info in current_adapters(reg, base, base_version):
        held = model.adapters.get(info.name)
        if held is not None and (held.sha256, held.scale) == (info.sha256, info.scale):
            continue
        attach_adapter(model, load_registered(reg, info), name=info.name, scale=info.scale)
        attached.append(info.name)
    return attached


def check_adapters(
    conn: Connection, log: list[audit.AuditEntry], store: ArtifactStore
) -> list[str]:
    """`Registry.verify`'s cross-check: each adapter row matches its push entry, blobs intact."""
    recorded = {
        (e.name, e.version, e.details.get("adapter"), e.details.get("adapter_version")): e.details
        for e in log
        if e.action == ADAPTER_ACTION
    }
    bases = {r.id: r for r in conn.execute(select(model_versions))}
    problems = []
    for row in conn.execute(select(adapter_versions).order_by(adapter_versions.c.id)):
        base = bases.get(row.base_id)
        where = f"adapter {row.name} v{row.version}" + (
            "" if base is None else f" of {base.name} v{base.version}"
        )
        entry = (
            None if base is None else recorded.get((base.name, base.version, row.name, row.version))
        )
        if entry is None:
            problems.append(f"{where} has no {ADAPTER_ACTION} entry in the audit log")
        elif _digest(row._mapping) != entry.get("row_sha256"):
            problems.append(f"{where} was edited after it was pushed")
        for fname, sha in json.loads(row.files).items():
            if (p := store.check(sha)) is not None:
                problems.append(f"artifact {fname} of {where}: {p.describe()}")
    return problems
