"""The model registry: versioned model directories and one atomic pointer to the active one.

Layout under ``registry_dir``::

    v000001/            a model directory (factors.artifacts layout)
    v000002/
    ACTIVE              JSON: {"version": "v000002", "previous": "v000001", "changed": ...}
    history.jsonl       one JSON line per promote / rollback

Switching the active version is one ``os.replace`` of ``ACTIVE`` (atomic on POSIX), so a
reader sees the old or the new version, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from factors.artifacts import ModelArtifact, load_model, save_model
from streamer.errors import RegistryError

VERSION_RE = re.compile(r"^v(\d{6,})$")
ACTIVE = "ACTIVE"
HISTORY = "history.jsonl"


@dataclass(frozen=True)
class ActiveModel:
    """A loaded model version: what the consumer folds against."""

    version: str
    artifact: ModelArtifact
    path: Path


class ModelRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- reading -----------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Every stored version, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(VERSION_RE.match(v).group(1)))

    def path(self, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise RegistryError(f"model version must look like v000001, got {version!r}")
        path = self.root / version
        if not path.is_dir():
            raise RegistryError(f"model version {version} not found in {self.root}; "
                                f"known: {', '.join(self.versions()) or 'none'}")
        return path

    def pointer(self) -> dict | None:
        try:
            return json.loads((self.root / ACTIVE).read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.root / ACTIVE} is unreadable: {exc}") from None

    def active_version(self) -> str | None:
        pointer = self.pointer()
        return None if pointer is None else pointer["version"]

    def load(self, version: str | None = None) -> ActiveModel:
        """Load ``version`` (default: the active one)."""
        if version is None:
            version = self.active_version()
            if version is None:
                raise RegistryError(f"no active model in {self.root}: train one and "
                                    "`foldstream model promote VERSION`")
        path = self.path(version)
        return ActiveModel(version=version, artifact=load_model(path), path=path)

    def history(self) -> list[dict]:
        try:
            lines = (self.root / HISTORY).read_text("utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    # -- writing -----------------------------------------------------------------------
    def add(self, artifact: ModelArtifact) -> str:
        """Store ``artifact`` as the next version (not yet active) and return its name."""
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self.versions()
        number = int(VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1
        while True:
            version = f"v{number:06d}"
            try:
                save_model(self.root / version, artifact)
                return version
            except FileExistsError:  # a concurrent add took this number
                number += 1

    def promote(self, version: str, reason: str = "promote") -> None:
        """Make ``version`` active with one atomic rename of the pointer file."""
        self.path(version)
        current = self.active_version()
        if current == version:
            return
        self._write_pointer({"version": version, "previous": current,
                             "changed": time.time(), "reason": reason})
        self._append_history({"action": reason, "version": version, "previous": current,
                              "time": time.time()})

    def rollback(self) -> str:
        """Re-activate the version that was active before the current one."""
        pointer = self.pointer()
        if pointer is None or not pointer.get("previous"):
            raise RegistryError("nothing to roll back to: no previous active version recorded")
        target = pointer["previous"]
        # The version before the target, for a second rollback, comes from the history.
        before = None
        for entry in reversed(self.history()):
            if entry.get("version") == target and entry.get("previous") != pointer["version"]:
                before = entry.get("previous")
                break
        self.path(target)
        self._write_pointer({"version": target, "previous": before,
                             "changed": time.time(), "reason": "rollback"})
        self._append_history({"action": "rollback", "version": target,
                              "previous": pointer["version"], "time": time.time()})
        return target

    def _write_pointer(self, pointer: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".ACTIVE.", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(pointer, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / ACTIVE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _append_history(self, entry: dict) -> None:
        with (self.root / HISTORY).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
