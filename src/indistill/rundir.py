"""A run directory's bookkeeping, kept out of the stage recipes: the lock, the config claim and
the evaluation cache.

- ``lock()``: one process per run directory (``runs/x is in use by pid N``); an OS file lock, so a
  killed process never leaves a stale lock behind.
- ``claim(cfg)``: written only after validation passed, so a bad-input error leaves nothing that
  blocks the corrected command. The comparison covers what determines the results, not where
  they are (``name``, ``out_dir``) or how they are shown (``progress``, ``logging``). A directory
  holding no finished stage (no checkpoint, or only the epoch checkpoints of an attempt that failed)
  may be claimed by another config: nothing in it is a result of the old one.
- ``.claim.json``: the SHA-256 of the ``config.yaml`` the claim wrote, so a hand-edited config (whose
  stages would be reported as finished under settings they were not trained with) is refused, and
  whether the last attempt failed.
- the lock holder removes the temp files of writes that a kill interrupted (``.<name>.<8 chars>.tmp``
  of :mod:`indistill.checkpoint`, ``.<name>.tmp<pid>`` of plot saves), and nothing else.
- the evaluation cache: one JSON per model, keyed by the checkpoint it was computed from (its
  SHA-256) and the evaluation settings; an entry is never reused for another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_json, atomic_write_text
from .config import Config, dump_config, load_yaml, to_dict
from .errors import UserError, clip

#: keys that do not change what a run computes
LOCATION_KEYS = ("name", "out_dir", "progress", "device", "logging", "evaluate")

#: the claim's record: the digest of config.yaml as written, and whether the last attempt failed
CLAIM_FILE = ".claim.json"

#: temp files of an interrupted atomic write: mkstemp's ``.<name>.<8 of [a-z0-9_]>.tmp`` (checkpoint.py) and
#: ``report.save_figure``'s ``.<name>.tmp<pid>``; nothing else in a run directory is ever removed
_TEMP_FILE = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|tmp\d+)$")

#: the folders of a run directory its writers put files in (not the folders of other run directories)
_WRITTEN_DIRS = ("", "checkpoints", "export", "eval", "plots")

log = logging.getLogger(__name__)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _without_report_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """The config less what only decides how results are compared (an arm's grid ``baseline``)."""
    arms = tree.get("arms")
    if isinstance(arms, list):
        tree = {**tree, "arms": [{k: v for k, v in a.items() if k != "baseline"} if isinstance(a, dict) else a
                                 for a in arms]}
    return tree


class RunDir:
    """``out_dir/name`` of one config."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.log = log  # the pipeline sets its run logger, so these notes reach log.txt

    def lock(self) -> None:
        """Take the directory's lock, or raise a one-line error naming the process that holds it."""
        import fcntl

        lock = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only or special file systems pass os.access and still refuse (/sys as root)
            raise UserError(f"cannot create run directory '{clip(str(self.path))}' ({e.strerror or e}); "
                            f"set out_dir=... to a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path} is in use by pid {pid}; wait for it to finish or use another name=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        self.remove_temp_files()

    def remove_temp_files(self, dirs: tuple[str, ...] = _WRITTEN_DIRS) -> list[Path]:
        """Remove what interrupted atomic writes left in ``dirs`` (relative to the run directory); only while
        holding the lock, so no write of a live process is touched. Returns the removed paths."""
        if self._lock_fd is None:
            return []
        removed = []
        for d in dirs:
            folder = self.path / d
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if _TEMP_FILE.match(e.name) and e.is_file(follow_symlinks=False):
                    try:
                        os.unlink(e.path)
                        removed.append(Path(e.path))
                    except OSError:
                        pass  # not ours to remove after all (permissions): harmless, it is never read
        if removed:
            self.log.info("removed %d temp file(s) of interrupted writes in %s", len(removed), self.path)
        return removed

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _state(self) -> dict[str, Any]:
        """``.claim.json``, or {} where there is none (a run made before it existed) or it is damaged."""
        try:
            state = json.loads((self.path / CLAIM_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return state if isinstance(state, dict) else {}

    def finished_files(self) -> list[Path]:
        """What a finished stage leaves: its checkpoint (not an epoch's ``*.last.pt``) or the run's results."""
        done = [p for p in (self.path / "checkpoints").glob("*.pt") if not p.name.endswith(".last.pt")]
        return done + [p for p in (self.path / "results.json",) if p.is_file()]

    def partial_files(self) -> list[Path]:
        """Epoch checkpoints of stages that have not finished (what a resume continues from)."""
        return sorted((self.path / "checkpoints").glob("*.last.pt"))

    def check(self, cfg: Config) -> list[str]:
        """Refuse to mix two different configs in one run directory (nothing is written).

        Returns the top-level keys that differ from the run's config: non-empty only where the directory
        may be claimed anyway, as it holds no finished stage (and no unfinished one, unless the last
        attempt failed)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            return []
        damaged = (f"{path} is empty or damaged; restore it, or delete that run directory, "
                   f"or use another name=...")
        try:
            text = path.read_bytes().decode("utf-8")
            old = load_yaml(text, str(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, UserError):
            raise UserError(damaged) from None
        if not isinstance(old, dict) or not old:
            raise UserError(damaged)
        state = self._state()
        known = {state.get("config_sha256"), state.get("previous_sha256")} - {None}
        if known and text_digest(text) not in known:
            raise UserError(
                f"{path} was edited by hand after the run started (its stages were trained under the config it "
                f"had then); restore it, or use another name=..."
            )
        new = _without_report_keys(to_dict(cfg))
        old = _without_report_keys(_as_current(old))
        defaults = to_dict(Config())  # a key added after the run was made compares as its default
        diff = [k for k in new if k not in LOCATION_KEYS and old.get(k, defaults.get(k)) != new[k]]
        if not diff:
            return []
        if not self.finished_files() and (not self.partial_files() or state.get("failed")):
            return diff
        raise UserError(
            f"{self.path} holds a run with a different config (differs in: {', '.join(diff)}); "
            f"use another name=... or delete that directory"
        )

    def claim(self, cfg: Config) -> None:
        """Check, then write ``config.yaml`` (atomically) and its digest.

        A directory taken over from another config (see :meth:`check`) loses that config's epoch
        checkpoints: resuming them would continue another config's training."""
        diff = self.check(cfg)
        if diff:
            stale = self.partial_files()
            for p in stale:
                p.unlink(missing_ok=True)
            self.log.warning("%s: the config changed (%s) after an attempt that finished no stage; starting over%s",
                     self.path, ", ".join(diff), f" (removed {', '.join(p.name for p in stale)})" if stale else "")
        text = dump_config(cfg)
        path = self.path / "config.yaml"
        try:
            previous = text_digest(path.read_bytes().decode("utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError):
            previous = None
        # The digest is written first: a kill between the two writes leaves config.yaml matching `previous_sha256`.
        atomic_write_json(self.path / CLAIM_FILE, {"config_sha256": text_digest(text), "previous_sha256": previous,
                                                   "failed": None})
        atomic_write_text(path, text)

    def record_failure(self, message: str) -> None:
        """Note in ``.claim.json`` that this attempt stopped on an error (only the lock holder writes it):
        its epoch checkpoints then do not keep a corrected config out (see :meth:`check`)."""
        if self._lock_fd is None:
            return
        state = self._state()
        if state:
            atomic_write_json(self.path / CLAIM_FILE, {**state, "failed": clip(message, 500)})

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
