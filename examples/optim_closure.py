"""``cgfac.optim``: an optimizer that owns the update, stepped with a closure.

The step is ``δ = lr·α·Δ + μ·δ₀`` with ``α`` and ``μ`` minimising the exact quadratic model of the
loss (the GGN of ``loss_type``), and the damping ``λ`` adapted by the Levenberg–Marquardt rule every
``damping_interval`` steps (kfac-jax's adaptive learning rate, momentum and damping). The closure
re-computes the loss: ``step(closure)`` needs it to measure the loss after the update.

    python examples/optim_closure.py [--cgfac] [--tiny]
"""

import argparse

import torch
from torch import nn

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cgfac", action="store_true", help="cgfac.optim.CGFAC instead of cgfac.optim.KFAC")
parser.add_argument("--tiny", action="store_true", help="a small model, few steps")
args = parser.parse_args()

torch.manual_seed(0)
width, steps = (32, 10) if args.tiny else (256, 100)
x = torch.randn(1024, 20)
y = (x @ torch.randn(20, 5)).argmax(1)

model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 5))
optimizer = cgfac.optim.CGFAC if args.cgfac else cgfac.optim.KFAC
opt = optimizer(model, loss_type="cross_entropy", damping=0.1)

losses = []
for step in range(steps):
    batch = torch.randint(0, len(x), (256,))
    xb, yb = x[batch], y[batch]

    def closure(xb=xb, yb=yb):  # re-computes this batch's loss (and gradient)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    losses.append(opt.step(closure).item())
    if step % max(1, steps // 5) == 0:
        print(f"step {step}: loss {losses[-1]:.4f}, damping {opt.damping:.3g}, "
              f"alpha {opt.last['alpha']:.3g}, mu {opt.last['mu']:.3g}")

print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
