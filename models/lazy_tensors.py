"""LazyTensors: a read-only name -> tensor mapping that loads each value when asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any


class LazyTensors(Mapping[str, Any]):
    """A read-only mapping whose values are loaded when asked for, one at a time, never kept:
    a checkpoint's weights stay in their (memory-mapped) files until a consumer reads each."""

    def __init__(
        self,
        names: Iterable[str],
        load: Callable[[str], Any],
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self._names = list(dict.fromkeys(names))
        self._known = set(self._names)
        self._load = load
        self._shapes = shapes

    def shape(self, name: str) -> tuple[int, ...]:
        """A value's shape, without reading it when the shapes were given."""
        if self._shapes is not None and name in self._shapes:
            return tuple(self._shapes[name])
        return tuple(self[name].shape)

    def __getitem__(self, name: str) -> Any:
        if name not in self._known:
            raise KeyError(name)
        return self._load(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
