"""A new direction stage, the README's worked example ("Where to add things"): one class with
``phase``, ``apply``, ``state_dict`` and ``load_state_dict``, appended to ``pre.stages``; the step
applies it and checkpoints carry its state inside each layer's entry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cgfac
from cgfac.precondition.transforms import Phase, StepData


class NormCap:
    """Caps each held direction's Frobenius norm at ``cap``; counts, per layer, the steps it did."""

    phase: Phase = "held"

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.capped: dict[str, int] = {}

    def apply(self, step: StepData) -> None:
        for name, x in step.directions.items():
            if x is not None and step.holds(name):
                norm = float(x.norm())
                if norm > self.cap:
                    x.mul_(self.cap / norm)
                    self.capped[name] = self.capped.get(name, 0) + 1

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {"capped": count} for name, count in self.capped.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]],
                        devices: Mapping[str, torch.device] | None = None) -> None:
        self.capped = {name: entry["capped"] for name, entry in state.items() if "capped" in entry}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def step(pre: cgfac.Preconditioner, net: nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    pre.step()
    return [p.grad.clone() for p in net.parameters()]


def test_a_new_stage_is_applied_at_its_phase_and_checkpointed() -> None:
    plain_net, capped_net = model(), model()
    plain = cgfac.CGFAC(plain_net, solver="eigen", kl_clip=None, damping=1e-2)
    capped = cgfac.CGFAC(capped_net, solver="eigen", kl_clip=None, damping=1e-2)
    cap = NormCap(0.5)
    capped.stages.append(cap)
    reference, result = step(plain, plain_net), step(capped, capped_net)
    for name, (w_ref, b_ref), (w, b) in zip(["0", "2"], zip(reference[::2], reference[1::2]),
                                            zip(result[::2], result[1::2])):
        x_ref, x = torch.cat([w_ref, b_ref[:, None]], 1), torch.cat([w, b[:, None]], 1)
        norm = float(x_ref.norm())
        expected = x_ref * min(1.0, 0.5 / norm)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-14)
        assert cap.capped.get(name, 0) == (1 if norm > 0.5 else 0)
    assert cap.capped  # the cap binds on at least one layer of this example
    state = capped.state_dict()
    assert {name: entry["capped"] for name, entry in state["layers"].items() if "capped" in entry} == cap.capped
    fresh = cgfac.CGFAC(model(), solver="eigen", kl_clip=None, damping=1e-2)
    restored = NormCap(0.5)
    fresh.stages.append(restored)
    fresh.load_state_dict(state)
    assert restored.capped == cap.capped
