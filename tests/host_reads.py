"""Counting host reads (every conversion of a tensor to a Python value), shared by the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_reads() -> Iterator[list[str]]:
    """Every conversion of a tensor to a Python value while inside (each is a host read)."""
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str):
        original = saved[name]

        def counted(self, *args, **kwargs):
            seen.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
