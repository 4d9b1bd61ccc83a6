"""One registry for every plug-in point: KD methods, models, datasets, optimizers, schedulers, warmup
losses, warmup schedules and retrieval metrics.

A :class:`Registry` maps a name to an object. Registering a name twice is an error (a plug-in that
silently replaced a built-in would change results without a word); looking up an unknown name is a
one-line :class:`~indistill.errors.UserError` with the closest names. Entries load lazily: the
built-ins on first use (``loader``), then third-party packages that declare an entry point in the
group ``indistill.<kind>`` (``[project.entry-points."indistill.methods"] mine = "pkg.mod"``), and a
config's ``plugins: [module, ...]`` imports a user's own modules before anything is built
(:func:`import_plugins`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import UserError, brief, suggest

T = TypeVar("T")

__all__ = ["Registry", "import_plugins"]


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in messages: "KD method", "dataset", ...).

    ``loader`` imports the modules whose decorators register the built-ins; ``group`` is the
    entry-point group third-party packages register under; ``hint`` ends an unknown-name error
    (e.g. "see `indistill methods`"); ``fallback(name)`` may supply an entry not registered (e.g. an
    optimizer looked up in ``torch.optim``) or return None.
    """

    def __init__(self, kind: str, *, loader: Callable[[], None] | None = None, group: str | None = None,
                 hint: str = "", fallback: Callable[[str], T | None] | None = None):
        self.kind = kind
        self.group = group
        self.hint = hint
        self._loader = loader
        self._fallback = fallback
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    # -- registration -----------------------------------------------------------------------------
    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T:
        """Register ``obj`` under ``name`` (and ``aliases``); a name already taken is an error."""
        for n in (name, *aliases):
            if not isinstance(n, str) or not n:
                raise ValueError(f"a {self.kind} needs a non-empty string name, got {n!r}")
            if n in self._entries or n in self._aliases:
                raise ValueError(f"{self.kind} '{n}' registered twice")
        self._entries[name] = obj
        self._aliases.update({a: name for a in aliases})
        return obj

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(obj: T) -> T:
            return self.add(name, obj, aliases=aliases)

        return deco

    # -- lookup -----------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before loading: the loaded modules register through this registry
        if self._loader is not None:
            self._loader()
        if self.group:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self.group):
                try:
                    ep.load()  # importing the module runs its registrations
                except Exception as e:  # a broken third-party plug-in must not hide the built-ins
                    raise UserError(f"plug-in '{ep.name}' ({ep.value}) of {self.group} failed to load: "
                                    f"{type(e).__name__}: {str(e)[:200]}; fix or uninstall it") from None

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or what it is an alias of)."""
        self._load()
        return self._aliases.get(name, name)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name is a one-line error naming the closest ones."""
        self._load()
        key = self._aliases.get(name, name)
        if key in self._entries:
            return self._entries[key]
        if self._fallback is not None:
            found = self._fallback(name)
            if found is not None:
                return found
        known = [*self._entries, *self._aliases]
        hint = f"; {self.hint}" if self.hint else f"; known: {', '.join(sorted(self._entries))}"
        raise UserError(f"unknown {self.kind} {brief(str(name))}{suggest(str(name), known)}{hint}")

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._aliases

    def names(self) -> list[str]:
        """The registered names, sorted (aliases excluded)."""
        self._load()
        return sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        """Alias -> registered name."""
        self._load()
        return dict(sorted(self._aliases.items()))

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._entries.items()))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import a config's ``plugins`` (module names) so their registrations run before anything is built."""
    for name in modules:
        if not isinstance(name, str) or not name.strip() or name.startswith("."):
            raise UserError(f"plugins: {name!r} is not an importable module name (e.g. mypackage.kd_methods)")
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, SyntaxError, or whatever the module raises on import
            text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"plugins: cannot import '{name}' ({type(e).__name__}: {text}); check the module "
                            f"name and that it is importable (PYTHONPATH)") from None
