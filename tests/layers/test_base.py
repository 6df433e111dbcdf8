"""The layer helpers' rows (:mod:`cgfac.layers.base`): captured rows against the dense reference (float64)."""

from __future__ import annotations

import torch
from reference import Case, capture, double_model, library_rows


def test_captured_rows_match_reference(case: Case) -> None:
    model = double_model(case)
    ref = capture(case, model)
    rows = library_rows(case, model)
    for name, (a, g, n) in ref.items():
        assert rows[name].n == n
        torch.testing.assert_close(rows[name].a, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rows[name].g, g, rtol=1e-10, atol=1e-12)
