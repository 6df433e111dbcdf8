"""The layer helpers' rows (:mod:`cgfac.layers.base`): captured rows against the dense reference (float64)."""

from __future__ import annotations

import pytest
import torch
from reference import Case, capture, cases

import cgfac

CASES = cases()


def library_rows(case: Case, model: torch.nn.Module) -> dict:
    """Rows captured by the library's hooks on one forward/backward of the mean-reduced loss."""
    pre = cgfac.CGFAC(model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    rows = {name: pre._rows(helper) for name, helper in pre.layers.items()}
    pre.remove()
    return rows


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request) -> Case:
    return request.param


def make(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.make_model().double()


def test_captured_rows_match_reference(case: Case) -> None:
    model = make(case)
    ref = capture(case, model)
    rows = library_rows(case, model)
    for name, (a, g, n) in ref.items():
        assert rows[name].n == n
        torch.testing.assert_close(rows[name].a, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows[name].g, g, rtol=1e-10, atol=1e-12)
