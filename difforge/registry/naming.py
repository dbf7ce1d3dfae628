"""Names in a registry: model names, aliases, versions, and where a registry's artifacts live."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.engine import make_url

from difforge.core.errors import InvalidArgumentError
from difforge.registry.config import RegistryConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^v?(\d+)$")


def artifacts_dir(config: RegistryConfig) -> Path:
    """Where `config`'s artifacts live: as given, else beside the SQLite file."""
    if config.artifacts:
        return Path(config.artifacts)
    url = make_url(config.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        return db.with_name(f"{db.stem}-artifacts")
    raise InvalidArgumentError(
        f"registry {url.render_as_string(hide_password=True)} needs an artifacts directory "
        "(--artifacts DIR): only a SQLite file registry has a default beside it"
    )


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgumentError(
            f"bad model name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)"
        )
    return name


def check_alias(alias: str) -> str:
    if (
        not isinstance(alias, str)
        or not _ALIAS.match(alias)
        or _VERSION.match(alias)
        or alias == "latest"
    ):
        raise InvalidArgumentError(
            f"bad alias {alias!r}: lowercase letters, digits, '_' or '-', starting with a letter; "
            "not 'latest' or a version like 'v3'"
        )
    return alias
