"""Content-addressed artifact store: every file lives once, at a path named by its sha256.

    ARTIFACTS/
      sha256/ab/abcdef...      the bytes whose sha256 is abcdef... (read-only)
      models/<weights sha256>-<config sha256[:12]>/
                               a model folder of links to those blobs, for difforge.model.load

Blobs are written to a temp file, fsynced, then renamed into place, so a crash never leaves a
half-written blob under a valid name. A blob is trusted only after its sha256 is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from difforge.common.atomic import atomic_file, atomic_folder
from difforge.pipeline import sha256_file


@dataclass(frozen=True)
class BlobProblem:
    """A blob that is missing or does not hash to its name."""

    sha256: str
    kind: str  # "missing" | "corrupted"
    actual_sha256: str | None = None
    size: int | None = None

    def describe(self) -> str:
        if self.kind == "missing":
            return f"blob {self.sha256[:12]}... is missing"
        return (
            f"blob {self.sha256[:12]}... is corrupted: its {self.size} bytes hash to "
            f"{(self.actual_sha256 or '')[:12]}..."
        )


class ArtifactStore:
    """Blobs addressed by sha256 under `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def put_file(self, src: str | Path, sha256: str | None = None) -> str:
        """Store a copy of `src` (if not already stored intact) and return its sha256."""
        sha256 = sha256 or sha256_file(src)
        dest = self.path(sha256)
        if dest.is_file() and self.check(sha256) is None:
            return sha256
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a corrupted copy: it is replaced with the good bytes
            os.chmod(dest, 0o644)
        h = hashlib.sha256()
        with open(src, "rb") as fin, atomic_file(dest, mode=0o444) as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
            if h.hexdigest() != sha256:  # raising here leaves `dest` as it was
                raise OSError(f"{src} changed while it was being stored")
        return sha256

    def check(self, sha256: str) -> BlobProblem | None:
        """None if the blob exists and hashes to its name, else what is wrong with it."""
        p = self.path(sha256)
        if not p.is_file():
            return BlobProblem(sha256, "missing")
        actual = sha256_file(p)
        if actual != sha256:
            return BlobProblem(sha256, "corrupted", actual, p.stat().st_size)
        return None

    def read_bytes(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def checkout(self, files: Mapping[str, str], key: str) -> Path:
        """A folder named `key` holding a link named f for every {f: sha256} in `files`."""
        folder = self.root / "models" / key
        targets = {f: self.path(sha).resolve() for f, sha in files.items()}
        if folder.is_dir():
            if all((folder / f).resolve() == t for f, t in targets.items()):
                return folder
            shutil.rmtree(folder, ignore_errors=True)  # stale or damaged: rebuild it
        # another process may make it meanwhile; theirs is as good as ours
        with atomic_folder(folder, if_exists="keep") as tmp:
            for fname, target in targets.items():
                (tmp / fname).parent.mkdir(parents=True, exist_ok=True)  # v2: component folders
                (tmp / fname).symlink_to(target)
        return folder
