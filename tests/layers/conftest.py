"""Fixtures of the layer tests."""

from __future__ import annotations

import pytest

from cgfac.layers import registry


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
