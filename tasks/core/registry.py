"""One registry per extension point, in the style of compressed-tensors' RegistryMixin.

An extension point is a base class that subclasses `Registry`; each of its
implementations is a subclass registered where it is defined:

    class QuantKind(Registry):
        what = "quantizer kind"

    @QuantKind.register("fp8")
    class Fp8(QuantKind): ...

`QuantKind.get("fp8")` is the one instance of `Fp8` (its `name` is "fp8"),
`QuantKind.registered()` every instance in order of registration. Nothing here
imports more than the standard library, so a registry's names cost nothing to read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

from storage.errors import PtqflowError

__all__ = ["Registry"]

T = TypeVar("T", bound="Registry")


class Registry:
    """Base of an extension point's base class: it gets a table of its own."""

    what: ClassVar[str] = "entry"  # what an entry is called in errors
    name: ClassVar[str] = ""  # set by `register`
    _entries: ClassVar[dict[str, Registry]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if Registry in cls.__bases__:
            cls._entries = {}

    @classmethod
    def register(cls, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register one instance of the decorated subclass under `name`."""

        def add(entry: type[T]) -> type[T]:
            if name in cls._entries:
                raise ValueError(f"{cls.what} {name!r} is registered twice")
            entry.name = name
            cls._entries[name] = entry()
            return entry

        return add

    @classmethod
    def get(cls: type[T], name: str) -> T:
        """The entry registered as `name`; a PtqflowError naming every one if there is none."""
        try:
            return cls._entries[name]
        except KeyError:
            raise PtqflowError(
                f"unknown {cls.what} {name!r}; ptqflow has {', '.join(cls._entries)}"
            ) from None

    @classmethod
    def registered(cls: type[T]) -> tuple[T, ...]:
        return tuple(cls._entries.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
