"""Shared test set-up. The tests sit in sub-folders mirroring the packages (``precondition``,
``capture``, ``layers``, ``curvature``, ``solvers``, ``optim``, ``distributed`` with its worker
scripts, ``integrations``, ``bench`` for ``cgfac_bench``, ``docs``), one ``test_<module>.py`` per
module with logic of its own, and ``test_<module>.py`` here for the top-level modules. The
sub-folders are packages (``__init__.py``: two may each hold a ``test_base.py``), except
``distributed``, whose tests import their worker scripts by name. ``tests/`` is on ``sys.path``
(``pythonpath`` in pyproject.toml) for the shared modules at its top level (``reference``,
``layer_reference``, ``preconditioners``, ``host_reads``, ``hf_models``), and the dense reference
cases of :mod:`reference` are fixtures for the tests in sub-folders."""

from __future__ import annotations

import os

import pytest
import torch
from reference import Case, cases

if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: the workers share the cores
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dense_cases() -> list[Case]:
    """Small models with inputs, targets and a loss, whose blocks the dense references cover."""
    return cases()


@pytest.fixture(params=cases(), ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    """Each dense reference case in turn (a test parametrized on ``case`` overrides it)."""
    return request.param
