"""Shared test set-up: ``tests/`` is on ``sys.path`` (``reference``, ``layer_reference``), and the
dense reference cases of :mod:`reference` are fixtures for the tests in subfolders."""

from __future__ import annotations

import pytest
from reference import Case, cases


@pytest.fixture(scope="session")
def dense_cases() -> list[Case]:
    """Small models with inputs, targets and a loss, whose blocks the dense references cover."""
    return cases()
