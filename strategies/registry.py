"""A tiny name -> factory registry, timm style: unknown names fail with the known ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class ConfigError(ValueError):
    """A run-config value that is not allowed; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class Registry(Generic[T]):
    """Maps user-facing names (kebab-case) to factory functions."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds a factory under ``name``."""

        def add(fn: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.key} {name!r} registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        """The factory for ``name``; a ConfigError listing the known names otherwise."""
        if name not in self._entries:
            raise ConfigError(self.key, name, f"one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
