"""The model registry: immutable versions with provenance, aliases, gated promotion, rollback.

    reg = Registry("sqlite:///registry.db")
    reg.register("runs/mnist/model", "mnist")               # -> Registration, version 1
    reg.promote("mnist", 1, to="production", gates="gates.json")
    reg.promote("mnist", 2, to="canary", percent=10)
    reg.resolve("mnist")                                     # production v1, canary v2 at 10%
    reg.load_version("mnist", "production")                  # -> difforge.pipeline.Model
    reg.rollback("mnist")                                    # production back to the previous one
    reg.verify()                                             # audit chain + every artifact

Every change is an audit entry (difforge.registry.audit). Alias history is not stored apart:
it is replayed from the audit log, so rollback follows exactly what the chain records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.engine import make_url

from difforge.common.hashchain import canonical_json, sha256_text
from difforge.core.errors import InvalidArgumentError
from difforge.pipeline import (
    CONFIG_FILE,
    MANIFEST_FILE,
    PIPELINE_FILE,
    WEIGHTS_FILE,
    Model,
    ModelIntegrityError,
    load,
    sha256_file,
)
from difforge.registry import audit
from difforge.registry.adapters import check_adapters
from difforge.registry.audit import AuditEntry
from difforge.registry.config import DEFAULT_URL, Gates, RegistryConfig, parse_gates
from difforge.registry.errors import (
    ArtifactIntegrityError,
    ConflictError,
    GateFailedError,
    NotFoundError,
    RegistryError,
)
from difforge.registry.gates import (
    ReportSummary,
    check_gates,
    smoke_sample,
    summarize_report,
)
from difforge.registry.naming import _VERSION, artifacts_dir, check_alias, check_name
from difforge.registry.provenance import Report, gather_provenance, load_reports, make_report
from difforge.registry.schema import (
    aliases,
    evaluation_reports,
    model_versions,
    open_engine,
    read_transaction,
    write_transaction,
)
from difforge.registry.store import ArtifactStore
from difforge.registry.types import Promotion, Registration, Resolution, VerifyReport, VersionInfo
from difforge.registry.verify import check_aliases, check_reports, check_versions, row_digest

GATED_ALIASES = ("production", "canary")
DEFAULT_CANARY_PERCENT = 10.0
# the columns of a version that never change; their digest is recorded when it is registered


def _report_text(report: Mapping[str, Any]) -> str:
    # NaN kept as NaN, non-ASCII escaped: the text (and its hash) of every stored report
    return canonical_json(report, ascii_only=True, allow_nan=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


class Registry:
    """A model registry on any SQLAlchemy database, with a content-addressed artifact store.

    Safe to share between threads; several processes may open the same database.

    Args:
        url: SQLAlchemy URL; default sqlite:///registry.db.
        artifacts: artifact directory; default "<db stem>-artifacts" beside a SQLite file.
        gates: default gates for promotions (a Gates, dict or JSON file); default `Gates()`.
        actor: who the audit log names; default $DIFFORGE_ACTOR or the login name.
        config: a RegistryConfig; the other arguments override its fields.
    """

    def __init__(
        self,
        url: str | None = None,
        artifacts: str | Path | None = None,
        *,
        gates: Gates | Mapping[str, Any] | str | Path | None = None,
        actor: str | None = None,
        config: RegistryConfig | None = None,
    ):
        cfg = config or RegistryConfig()
        cfg = RegistryConfig(
            url=url or cfg.url or DEFAULT_URL,
            artifacts=str(artifacts) if artifacts is not None else cfg.artifacts,
            gates=parse_gates(gates, cfg.gates),
            lock_timeout_s=cfg.lock_timeout_s,
        )
        self.config = cfg
        self.store = ArtifactStore(artifacts_dir(cfg))
        db = make_url(cfg.url)
        if db.get_backend_name() == "sqlite" and db.database not in (None, "", ":memory:"):
            Path(db.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(cfg.url, cfg.lock_timeout_s)
        self.actor = actor or audit.default_actor()

    def __repr__(self) -> str:
        return f"Registry({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def _audit(
        self, conn: Connection, action: str, name=None, version=None, **details
    ) -> AuditEntry:
        return audit.append(
            conn, action, actor=self.actor, name=name, version=version, details=details
        )

    # --- registration ---------------------------------------------------------------------

    def register(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        reports: Sequence[str | Path | Mapping[str, Any]] = (),
    ) -> Registration:
        """Register a model folder as a new immutable version (or find it, if already there).

        The folder must load (`difforge.pipeline.load`: manifest, safetensors, strict weights).
        Its files are copied into the artifact store; evaluation reports found in the folder or
        passed in are attached. Identical weights under the same name give the existing version
        (new reports are still attached); identical weights with another config.json conflict.

        Args:
            path: the model folder.
            name: the registered model name; default the model's own `config.name`.
            reports: extra evaluation reports (JSON paths or dicts) for this version.

        Returns:
            Registration(info, created, reports_added).
        """
        folder = Path(path)
        folder = folder.parent if folder.is_file() else folder
        model = load(folder)  # proves the folder is complete, intact and loadable
        name = check_name(name or model.name)
        listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        files = {**listed, MANIFEST_FILE: sha256_file(folder / MANIFEST_FILE)}
        # A v1 folder is identified by its weights, a v2 pipeline by pipeline.json (which
        # records every component's weights sha256); either is the model's sha256.
        identity, config_file = (
            (PIPELINE_FILE, PIPELINE_FILE)
            if PIPELINE_FILE in files
            else (WEIGHTS_FILE, CONFIG_FILE)
        )
        if files[identity] != model.sha256:
            raise ModelIntegrityError(f"{folder} changed while it was being registered")
        prov = gather_provenance(folder, model.config)
        reps = load_reports(folder, reports, model.sha256)
        for fname, sha in files.items():
            self.store.put_file(folder / fname, sha)
        row = {
            "name": name,
            "weights_sha256": files[identity],
            "config_sha256": files[config_file],
            "files": canonical_json(files),
            "config": self.store.read_bytes(files[config_file]).decode(),
            "dataset_hash": prov.dataset_hash,
            "code_version": prov.code_version,
            "training_config": _json_or_none(prov.training_config),
            "training_metrics": canonical_json(prov.training_metrics),
            "card": prov.card,
            "source": str(folder.resolve()),
            "created_by": self.actor,
        }
        with write_transaction(self.engine) as conn:
            version, created = self._insert_version(conn, row)
            vid = self._row(conn, name, version).id
            added = sum(self._attach(conn, vid, name, version, r) for r in reps)
        return Registration(self.get(name, version), created, added)

    def _insert_version(self, conn: Connection, row: dict[str, Any]) -> tuple[int, bool]:
        name = row["name"]
        existing = conn.execute(
            select(model_versions).where(
                model_versions.c.name == name,
                model_versions.c.weights_sha256 == row["weights_sha256"],
            )
        ).first()
        if existing is not None:
            if existing.config_sha256 != row["config_sha256"]:
                raise ConflictError(
                    f"these weights are already registered as {name} v{existing.version} with a "
                    "different config.json; register under another name or restore that config"
                )
            return existing.version, False
        last = conn.scalar(
            select(func.max(model_versions.c.version)).where(model_versions.c.name == name)
        )
        row = {**row, "version": (last or 0) + 1, "created_at": audit.now()}
        conn.execute(model_versions.insert().values(**row))
        self._audit(
            conn,
            "register",
            name,
            row["version"],
            weights_sha256=row["weights_sha256"],
            config_sha256=row["config_sha256"],
            files=json.loads(row["files"]),
            dataset_hash=row["dataset_hash"],
            code_version=row["code_version"],
            row_sha256=row_digest(row),
        )
        return row["version"], True

    def _attach(
        self, conn: Connection, version_id: int, name: str, version: int, r: Report
    ) -> bool:
        text = _report_text(r.report)
        sha = sha256_text(text)
        seen = conn.scalar(
            select(evaluation_reports.c.id).where(
                evaluation_reports.c.version_id == version_id, evaluation_reports.c.sha256 == sha
            )
        )
        if seen is not None:
            return False
        conn.execute(
            evaluation_reports.insert().values(
                version_id=version_id,
                sha256=sha,
                report=text,
                source=r.source,
                created_at=audit.now(),
            )
        )
        self._audit(
            conn,
            "report",
            name,
            version,
            report_sha256=sha,
            source=r.source,
            metrics=r.summary.metrics,
        )
        return True

    def attach_report(
        self, name: str, ref: int | str, report: str | Path | Mapping[str, Any]
    ) -> ReportSummary:
        """Attach an evaluation report (JSON path or dict) to a version; returns its summary."""
        info = self.get(name, ref)
        if isinstance(report, Mapping):
            r = make_report(report, "(passed in)", info.weights_sha256)
        else:
            (r,) = load_reports(None, [report], info.weights_sha256)
        with write_transaction(self.engine) as conn:
            self._attach(conn, self._row(conn, name, info.version).id, name, info.version, r)
        return r.summary

    # --- reading --------------------------------------------------------------------------

    def _row(self, conn: Connection, name: str, ref: int | str):
        """The model_versions row `ref` names: a version (3, "3", "v3"), "latest" or an alias."""
        q = select(model_versions).where(model_versions.c.name == name)
        m = _VERSION.match(str(ref))
        number = ref if isinstance(ref, int) else int(m.group(1)) if m else None
        if number is not None and not 0 < number < 2**63:  # past any database's integer
            row = None
        elif number is not None:
            row = conn.execute(q.where(model_versions.c.version == number)).first()
        elif ref == "latest":
            row = conn.execute(q.order_by(model_versions.c.version.desc()).limit(1)).first()
        else:
            v = conn.scalar(
                select(aliases.c.version).where(aliases.c.name == name, aliases.c.alias == ref)
            )
            row = (
                None if v is None else conn.execute(q.where(model_versions.c.version == v)).first()
            )
        if row is None:
            if not conn.scalar(select(func.count()).where(model_versions.c.name == name)):
                raise NotFoundError(f"no model named {name!r} in the registry")
            what = f"alias {ref!r}" if number is None else f"version {number}"
            raise NotFoundError(f"{name} has no {what}")
        return row

    def _summaries(self, conn: Connection, version_id: int) -> tuple[ReportSummary, ...]:
        texts = conn.scalars(
            select(evaluation_reports.c.report)
            .where(evaluation_reports.c.version_id == version_id)
            .order_by(evaluation_reports.c.id)
        )
        return tuple(summarize_report(json.loads(t)) for t in texts)  # never trust a cached copy

    def _info(self, conn: Connection, row) -> VersionInfo:
        names = conn.scalars(
            select(aliases.c.alias)
            .where(aliases.c.name == row.name, aliases.c.version == row.version)
            .order_by(aliases.c.alias)
        )
        return VersionInfo(
            row.name,
            row.version,
            row.weights_sha256,
            row.config_sha256,
            json.loads(row.files),
            json.loads(row.config),
            row.dataset_hash,
            row.code_version,
            _loads(row.training_config),
            json.loads(row.training_metrics),
            row.card,
            row.source,
            row.created_at,
            row.created_by,
            tuple(names),
            self._summaries(conn, row.id),
        )

    def get(self, name: str, ref: int | str = "latest") -> VersionInfo:
        """One version: by number (3, "v3"), "latest", or an alias ("production", "canary", ...)."""
        with read_transaction(self.engine) as conn:
            return self._info(conn, self._row(conn, name, ref))

    def list_models(self) -> list[str]:
        with read_transaction(self.engine) as conn:
            return list(
                conn.scalars(
                    select(model_versions.c.name).distinct().order_by(model_versions.c.name)
                )
            )

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of `name`, oldest first (empty if the name is unknown)."""
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(model_versions)
                .where(model_versions.c.name == name)
                .order_by(model_versions.c.version)
            ).all()
            return [self._info(conn, r) for r in rows]

    def audit_log(self, name: str | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first: all, or one model's; the last `limit` of them."""
        with read_transaction(self.engine) as conn:
            return audit.entries(conn, name, limit)

    def resolve(self, name: str) -> Resolution:
        """Which versions of `name` serve traffic now: production, and canary with its share."""
        with read_transaction(self.engine) as conn:
            self._row(conn, check_name(name), "latest")  # unknown name -> NotFoundError
            rows = {r.alias: r for r in conn.execute(select(aliases).where(aliases.c.name == name))}
            prod, can = rows.get("production"), rows.get("canary")
            return Resolution(
                name,
                None if prod is None else self._info(conn, self._row(conn, name, prod.version)),
                None if can is None else self._info(conn, self._row(conn, name, can.version)),
                0.0 if can is None else float(can.percent or 0.0),
                max(e.seq for e in audit.entries(conn, name, limit=1)),
            )

    # --- loading --------------------------------------------------------------------------

    def load_version(self, name: str, ref: int | str = "production") -> Model:
        """Load a version as a difforge Model, after checking every stored file's sha256.

        A missing, truncated or modified artifact is refused (ArtifactIntegrityError) and the
        refusal is written to the audit log.
        """
        info = self.get(name, ref)
        self._require_intact(info, "load")
        folder = self.store.checkout(info.files, f"{info.weights_sha256}-{info.config_sha256[:12]}")
        try:
            return load(folder)
        except ModelIntegrityError as e:  # changed after the check above
            self._refuse_damaged(info, "load", {"(load)": str(e)})

    def _require_intact(self, info: VersionInfo, action: str) -> None:
        """Recompute the sha256 of every blob of `info`; ArtifactIntegrityError (audited) if
        any is missing or modified. Run by every load and promotion, whatever the gates say."""
        bad = {f: p.describe() for f, sha in info.files.items() if (p := self.store.check(sha))}
        if bad:
            self._refuse_damaged(info, action, bad)

    def _refuse_damaged(self, info: VersionInfo, action: str, problems: dict[str, str]):
        with write_transaction(self.engine) as conn:
            self._audit(conn, "integrity_failure", info.name, info.version, files=problems)
        listed = "; ".join(f"{f}: {p}" for f, p in problems.items())
        raise ArtifactIntegrityError(
            f"refusing to {action} {info.ref}: stored artifacts failed their sha256 check "
            f"({listed}); recorded in the audit log; re-register the original folder to repair them"
        )

    # --- aliases --------------------------------------------------------------------------

    def _alias_rows(self, conn: Connection, name: str) -> dict[str, Any]:
        return {r.alias: r for r in conn.execute(select(aliases).where(aliases.c.name == name))}

    def _apply(self, conn: Connection, name: str, changes: Mapping[str, dict | None]) -> None:
        for alias, state in changes.items():
            conn.execute(delete(aliases).where(aliases.c.name == name, aliases.c.alias == alias))
            if state is not None:
                conn.execute(
                    aliases.insert().values(
                        name=name,
                        alias=alias,
                        version=state["version"],
                        percent=state.get("percent"),
                        updated_at=audit.now(),
                    )
                )

    def _alias_stack(self, conn: Connection, name: str, alias: str) -> list[int]:
        """The versions `alias` went through that have not been rolled back, oldest first."""
        stack: list[int] = []
        for e in audit.entries(conn, name):
            changes = e.details.get("aliases") or {}
            if alias not in changes:
                continue
            state = changes[alias]
            if e.action == "rollback" and e.details.get("alias") == alias:
                stack.pop() if stack else None
            elif state is None:
                stack.clear()
            elif not stack or stack[-1] != state["version"]:
                stack.append(state["version"])
        return stack

    def _summary(self, conn: Connection, name: str, version: int) -> ReportSummary | None:
        reports = self._summaries(conn, self._row(conn, name, version).id)
        return reports[-1] if reports else None

    def promote(
        self,
        name: str,
        version: int | str,
        to: str = "production",
        *,
        gates: Gates | Mapping[str, Any] | str | Path | None = None,
        percent: float | None = None,
    ) -> Promotion:
        """Point `to` ("production" or "canary") at a version, if it passes every gate.

        The smoke sample loads the version from the registry and samples before the write lock
        is taken; the metric gates are checked under the lock, against production as it is at
        that moment, so concurrent promotions cannot both compare against a stale production.
        Promoting the canary's version to production ends the canary.

        Args:
            name, version: the version (a number, "latest" or an alias).
            to: "production" or "canary".
            gates: overrides of the registry's default gates (Gates, dict or JSON path).
            percent: the canary's share of traffic, 0-100 (default 10); canary only.

        Returns:
            Promotion with each gate's result.

        Raises:
            GateFailedError: a gate failed; the alias is unchanged and the refusal is audited.
            ArtifactIntegrityError: a stored blob of the version is missing or does not hash to
                its sha256 (checked on every promotion, with or without the smoke sample).
        """
        if to not in GATED_ALIASES:
            raise InvalidArgumentError(
                f"promote to 'production' or 'canary', not {to!r}; free-form aliases: set_alias"
            )
        percent = _check_percent(to, percent)
        g = parse_gates(gates, self.config.gates)
        info = self.get(name, version)
        v = info.version
        smoke = None
        self._require_intact(info, "promote")  # the smoke sample's load checks again: cheap
        if g.smoke_sample:
            smoke = smoke_sample(self.load_version(name, v), g.smoke_images, g.smoke_steps)
        with write_transaction(self.engine) as conn:
            current = self._alias_rows(conn, name)
            cur = current.get(to)
            if cur is not None and cur.version == v and (cur.percent == percent):
                return Promotion(info, to, cur.version, (), changed=False)
            prod = current.get("production")
            if to == "canary" and prod is not None and prod.version == v:
                raise InvalidArgumentError(
                    f"{name} v{v} is production; a canary is another version"
                )
            prod_summary = (
                None
                if prod is None or prod.version == v
                else self._summary(conn, name, prod.version)
            )
            label = "production" if prod is None else f"production v{prod.version}"
            results = check_gates(g, self._summary(conn, name, v), prod_summary, label)
            results += [smoke] if smoke is not None else []
            failed = [r for r in results if not r.passed]
            record = {
                "alias": to,
                "from": None if cur is None else cur.version,
                "gates": [r.to_dict() for r in results],
                "gate_config": g.model_dump(),
            }
            if failed:
                self._audit(conn, "promotion_refused", name, v, **record)
            else:
                changes: dict[str, dict | None] = {to: {"version": v, "percent": percent}}
                can = current.get("canary")
                if to == "production" and can is not None and can.version == v:
                    changes["canary"] = None  # the canary graduated
                self._apply(conn, name, changes)
                self._audit(conn, "promote", name, v, aliases=changes, **record)
        if failed:
            raise GateFailedError(name, v, to, failed)
        return Promotion(self.get(name, v), to, record["from"], tuple(results))

    def rollback(
        self, name: str, alias: str = "production", reason: str | None = None
    ) -> VersionInfo:
        """Point `alias` back at the version it had before its latest change; no gates, at once.

        Returns:
            The version `alias` now points at.
        """
        with write_transaction(self.engine) as conn:
            cur = self._alias_rows(conn, name).get(alias)
            if cur is None:
                self._row(conn, name, "latest")
                raise NotFoundError(f"{name} has no {alias} to roll back")
            stack = self._alias_stack(conn, name, alias)
            if len(stack) < 2:
                raise RegistryError(
                    f"no earlier {alias} version of {name} to roll back to (it is v{cur.version})"
                )
            target = stack[-2]
            changes = {alias: {"version": target, "percent": cur.percent}}
            self._apply(conn, name, changes)
            self._audit(
                conn,
                "rollback",
                name,
                target,
                alias=alias,
                aliases=changes,
                **{"from": cur.version},
                reason=reason,
            )
            return self._info(conn, self._row(conn, name, target))

    def set_alias(self, name: str, alias: str, version: int | str) -> VersionInfo:
        """Point a free-form alias (e.g. "staging") at a version. production/canary: `promote`."""
        check_alias(alias)
        if alias in GATED_ALIASES:
            raise InvalidArgumentError(
                f"{alias!r} is gated: use promote (difforge registry promote)"
            )
        with write_transaction(self.engine) as conn:
            row = self._row(conn, name, version)
            cur = self._alias_rows(conn, name).get(alias)
            changes = {alias: {"version": row.version, "percent": None}}
            self._apply(conn, name, changes)
            self._audit(
                conn,
                "alias_set",
                name,
                row.version,
                alias=alias,
                aliases=changes,
                **{"from": None if cur is None else cur.version},
            )
            return self._info(conn, row)

    def remove_alias(self, name: str, alias: str, reason: str | None = None) -> int:
        """Drop an alias (not production: roll back or promote instead); returns its old version."""
        if alias == "production":
            raise InvalidArgumentError(
                "production cannot be removed; roll back or promote another version"
            )
        with write_transaction(self.engine) as conn:
            cur = self._alias_rows(conn, name).get(alias)
            if cur is None:
                self._row(conn, name, "latest")
                raise NotFoundError(f"{name} has no alias {alias!r}")
            self._apply(conn, name, {alias: None})
            self._audit(
                conn,
                "alias_removed",
                name,
                cur.version,
                alias=alias,
                aliases={alias: None},
                reason=reason,
            )
            return cur.version

    def set_canary_percent(self, name: str, percent: float) -> Resolution:
        """Change the canary's share of traffic (0-100) without re-running its gates."""
        percent = _check_percent("canary", percent)
        with write_transaction(self.engine) as conn:
            cur = self._alias_rows(conn, name).get("canary")
            if cur is None:
                self._row(conn, name, "latest")
                raise NotFoundError(f"{name} has no canary")
            changes = {"canary": {"version": cur.version, "percent": percent}}
            self._apply(conn, name, changes)
            self._audit(
                conn, "canary_percent", name, cur.version, aliases=changes, **{"from": cur.percent}
            )
        return self.resolve(name)

    def auto_rollback_canary(
        self, name: str, reason: str, *, expected_version: int | None = None
    ) -> VersionInfo | None:
        """Demote the canary at once (serving calls this when the canary does worse).

        Args:
            name: the model.
            reason: why, e.g. `should_rollback(...)`'s answer; kept in the audit entry.
            expected_version: demote only if the canary is still this version (a promotion
                since the window was measured must not be undone by stale numbers).

        Returns:
            The demoted version, or None if there was no (such) canary.
        """
        with write_transaction(self.engine) as conn:
            cur = self._alias_rows(conn, name).get("canary")
            if cur is None or (expected_version is not None and cur.version != expected_version):
                return None
            self._apply(conn, name, {"canary": None})
            self._audit(
                conn,
                "canary_rollback",
                name,
                cur.version,
                alias="canary",
                aliases={"canary": None},
                reason=reason,
                percent=cur.percent,
            )
            return self._info(conn, self._row(conn, name, cur.version))

    # --- verification ---------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the audit chain, every version row, report, alias and stored artifact.

        Returns:
            VerifyReport; `.problems` names each edited row, missing entry or bad artifact.
            Problems are also recorded in the audit log (action "verify_failed").
        """
        with read_transaction(self.engine) as conn:
            problems, count, head = audit.verify_chain(conn)
            log = audit.entries(conn)
            rows = conn.execute(select(model_versions).order_by(model_versions.c.id)).all()
            problems += check_versions(rows, log)
            problems += check_reports(conn, rows, log)
            problems += check_aliases(conn, log)
            problems += check_adapters(conn, log, self.store)  # rows + blobs of adapters
        blobs: dict[str, str] = {}
        for row in rows:
            for fname, sha in json.loads(row.files).items():
                blobs.setdefault(sha, f"{fname} of {row.name} v{row.version}")
        for sha, what in blobs.items():
            if (p := self.store.check(sha)) is not None:
                problems.append(f"artifact {what}: {p.describe()}")
        if problems:  # a finding is an event worth its own (chained) entry
            with write_transaction(self.engine) as conn:
                self._audit(conn, "verify_failed", problems=problems[:100], count=len(problems))
        return VerifyReport(problems, count, head, len(blobs), len(rows))


def _check_percent(alias: str, percent: float | None) -> float | None:
    if alias != "canary":
        if percent is not None:
            raise InvalidArgumentError("a traffic percent applies to the canary only")
        return None
    percent = DEFAULT_CANARY_PERCENT if percent is None else percent
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise InvalidArgumentError(f"canary percent must be in [0, 100], got {percent!r}")
    return float(percent)
