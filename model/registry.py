"""One registry mechanism (pure Python, light): host adapters and comparison methods register the same way.

As lm-evaluation-harness's ``Registry``: entries of one checked base class under unique names (a name
registered twice with another object is refused), and an optional *package* whose modules are all
imported on the first lookup, so adding an entry is adding one module with one decorator line, with
no list to edit::

    HOSTS = Registry("host family", base=HostAdapter, package="pmod_bench.model.hosts")

    @HOSTS.register("llava_next", "pmod_llava_next")
    class LlavaNextHost(HostAdapter): ...
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (see the module docstring)."""

    def __init__(self, kind: str, base: Optional[type] = None, package: Optional[str] = None,
                 normalise: Callable[[str], str] = lambda name: name) -> None:
        self.kind, self.base, self.package, self.normalise = kind, base, package, normalise
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, *names: str) -> Callable[[T], T]:
        """Class decorator: register the class under ``names`` (its base class checked; collisions refused)."""

        def deco(obj: T) -> T:
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"a {self.kind} must be a subclass of {self.base.__name__}, got {obj!r}")
            for name in names:
                key = self.normalise(name)
                if key in self._entries and self._entries[key] is not obj:
                    raise TypeError(f"{self.kind} '{name}' is registered twice ({self._entries[key]!r}, {obj!r})")
                self._entries[key] = obj
            return obj

        return deco

    def discover(self) -> None:
        """Import every module of the registry's package once (each registers its entries)."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def lookup(self, name: str) -> Optional[T]:
        """The entry registered as ``name`` (after discovery), or None."""
        self.discover()
        return self._entries.get(self.normalise(str(name)))

    def known(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def close_match(self, name: str) -> Optional[str]:
        close = difflib.get_close_matches(self.normalise(str(name)), self.known(), n=1)
        return close[0] if close else None

    def items(self) -> Iterator[tuple[str, T]]:
        self.discover()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        return self.lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.known())


__all__ = ["Registry"]
