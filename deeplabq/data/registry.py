"""Dataset readers by ``dataset.name``: the one place that turns a dataset's name into the code that reads it.

A reader module in ``deeplabq/data/readers/`` registers a ``Reader`` subclass under each name it serves with
``@register_reader("name")`` (a class may carry several); ``get_reader`` looks a name up and fails with a
``DatasetError`` that lists the known names. Adding a dataset is one reader module plus one
``conf/dataset/<name>.yaml`` whose ``name`` is the registered name.
"""

from __future__ import annotations

from deeplabq.data.base import DatasetError, Reader

_READERS: dict[str, Reader] = {}


def register_reader(name: str):
    """Class decorator: register an instance of the ``Reader`` subclass as the reader of ``dataset.name=name``."""

    def register(cls: type[Reader]) -> type[Reader]:
        if name in _READERS:
            raise ValueError(f"dataset reader {name!r} is registered twice ({type(_READERS[name]).__name__}, "
                             f"{cls.__name__})")
        _READERS[name] = cls()
        return cls

    return register


def unregister_reader(name: str) -> None:
    """Forget the reader of ``name`` (for tests that register a reader of their own)."""
    del _READERS[name]


def reader_names() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_READERS)


def get_reader(name: str) -> Reader:
    if name not in _READERS:
        known = ", ".join(reader_names())
        raise DatasetError(f"dataset.name={name!r} has no reader; known: {known}")
    return _READERS[name]
