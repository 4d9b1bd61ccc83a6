"""A run directory's bookkeeping, kept out of the stage recipes: the lock, the config claim and
the evaluation cache.

- ``lock()``: one process per run directory (``runs/x is in use by pid N``); an OS file lock, so a
  killed process never leaves a stale lock behind.
- ``claim(cfg)``: written only after validation passed, so a bad-input error leaves nothing that
  blocks the corrected command. The comparison covers what determines the results, not where
  they are (``name``, ``out_dir``) or how they are shown (``progress``, ``logging``).
- the evaluation cache: one JSON per model, keyed by the checkpoint it was computed from (its
  SHA-256) and the evaluation settings; an entry is never reused for another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_json, atomic_write_text
from .config import Config, dump_config, to_dict
from .errors import UserError

#: keys that do not change what a run computes
LOCATION_KEYS = ("name", "out_dir", "progress", "device", "logging", "evaluate")


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes (checkpoints are small enough; a 100 MB file takes ~0.3 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_current(old: dict[str, Any]) -> dict[str, Any]:
    """An older run's config read through today's schema (renamed keys upgraded, keys added since then
    at their defaults, nested ones included); as written if it no longer parses."""
    from .config import from_dict, upgrade_legacy

    try:
        return to_dict(from_dict(Config, upgrade_legacy(old)))
    except (UserError, TypeError, ValueError):
        return old


class RunDir:
    """``out_dir/name`` of one config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the directory's lock, or raise a one-line error naming the process that holds it."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path} is in use by pid {pid}; wait for it to finish or use another name=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def check(self, cfg: Config) -> None:
        """Refuse to mix two different configs in one run directory (nothing is written)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            return
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = None
        if not isinstance(old, dict):
            raise UserError(f"{path} is unreadable; delete that run directory or use another name=...")
        new = to_dict(cfg)
        old = _as_current(old)
        defaults = to_dict(Config())  # a key added after the run was made compares as its default
        diff = [k for k in new if k not in LOCATION_KEYS and old.get(k, defaults.get(k)) != new[k]]
        if diff:
            raise UserError(
                f"{self.path} holds a run with a different config (differs in: {', '.join(diff)}); "
                f"use another name=... or delete that directory"
            )

    def claim(self, cfg: Config) -> None:
        """Check, then write ``config.yaml`` (atomically)."""
        self.check(cfg)
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))

    # -- evaluation cache -----------------------------------------------------
    def _cache_path(self, name: str) -> Path:
        return self.path / "eval" / f"{name}.json"

    @staticmethod
    def cache_key(checkpoint: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
        return {"checkpoint_sha256": file_fingerprint(checkpoint), "settings": settings}

    def cached(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cached evaluation of ``name`` if it was computed from exactly ``key``."""
        p = self._cache_path(name)
        if not p.is_file():
            return None
        try:
            entry = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a foreign or damaged file: recompute
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry.get("result")

    def store(self, name: str, key: dict[str, Any], result: dict[str, Any]) -> None:
        atomic_write_json(self._cache_path(name), {"key": key, "result": result}, indent=None)
