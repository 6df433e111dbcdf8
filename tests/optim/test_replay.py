"""cgfac.optim's true Fisher from a forward of the kept samples alone gives the rows of the full pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cgfac
import cgfac.capture.capture
from cgfac import losses


@pytest.fixture
def fixed_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled targets that depend on the row's inputs only (``ŷ = z + sin(row sum)``), so both
    paths draw the same targets for the same samples."""
    original = losses.sampled_loss

    def deterministic(outputs: torch.Tensor, loss_type: str, generator: object = None,
                      targets: torch.Tensor | None = None) -> torch.Tensor:
        rows = outputs.reshape(-1, outputs.shape[-1])
        return original(outputs, loss_type, None, rows.detach() + torch.sin(rows.detach().sum(1, keepdim=True)))

    monkeypatch.setattr(cgfac.capture.capture, "sampled_loss", deterministic)


def _run(sample_subset: bool, cls: type = cgfac.optim.CGFAC, **kwargs: object) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opt = cls(model, fisher="true", loss_type="gaussian", curvature_samples=7, sample_subset=sample_subset,
              damping=0.1, adapt_damping=False, **kwargs)
    calls = {"n": 0}
    pre = opt.preconditioner
    inner = pre.sample_fisher

    def counting(outputs: torch.Tensor, *a: object, **k: object) -> None:
        calls["n"] = max(calls["n"], outputs.shape[0])
        inner(outputs, *a, **k)

    pre.sample_fisher = counting  # type: ignore[method-assign]
    for _ in range(3):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
            loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], calls["n"]


@pytest.mark.usefixtures("fixed_targets")
@pytest.mark.parametrize("cls", [cgfac.optim.CGFAC, cgfac.optim.KFAC])
def test_subset_forward_gives_the_same_updates(cls: type) -> None:
    full, full_rows = _run(False, cls)
    subset, subset_rows = _run(True, cls)
    assert full_rows == 40 and subset_rows == 7  # the sampled backward ran on 7 samples, not 40
    for a, b in zip(full, subset):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batchnorm_models_sample_the_whole_batch() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    opt = cgfac.optim.KFAC(model, fisher="true", loss_type="cross_entropy", curvature_samples=2)
    assert not opt.recorder.subset_sampling((torch.randn(8, 4),))
    with pytest.raises(TypeError, match="sample_subset"):
        cgfac.optim.CGFAC(nn.Linear(3, 2), loss_type="gaussian", sample_subset=1)  # type: ignore[arg-type]
