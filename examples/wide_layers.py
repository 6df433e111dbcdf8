"""Wide layers: ``cgfac.optim.CGFAC.wide``, CG-FAC's own regime.

An autoencoder with wide hidden layers (2000 and more) trained on a reconstruction loss. Per layer
and step, CG-FAC solves K-FAC's system from 128 curvature rows by the exact low-rank solve
(``O(rows · d_in · d_out)``, no ``d × d`` factor, no eigendecomposition of one), with factored
damping adapted by the Levenberg–Marquardt rule (``cgfac.optim.WIDE_DEFAULTS``, each overridable).

    python examples/wide_layers.py [--width 2048] [--tiny]
"""

import argparse

import torch
from torch import nn

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--width", type=int, default=2048, help="the hidden width")
parser.add_argument("--tiny", action="store_true", help="width 256, few steps")
args = parser.parse_args()

torch.manual_seed(0)
width, steps = (256, 6) if args.tiny else (args.width, 50)
data = torch.randn(4096, 16) @ torch.randn(16, 64)  # 64-dimensional data on a 16-dimensional subspace
# --8<-- [start:model]
model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, width),
                      nn.Tanh(), nn.Linear(width, 64))
# "gaussian": the loss is 0.5 · squared error summed over outputs, averaged over samples
opt = cgfac.optim.CGFAC.wide(model, loss_type="gaussian")

losses = []
for _ in range(steps):
    xb = data[torch.randint(0, len(data), (512,))]  # 128 curvature rows (first), 128 for the quadratic model (last)

    def closure(xb=xb):  # re-computes this batch's loss (and gradient)
        opt.zero_grad()
        loss = 0.5 * (model(xb) - xb).pow(2).sum(1).mean()
        loss.backward()
        return loss

    losses.append(opt.step(closure).item())
# --8<-- [end:model]

stats = opt.preconditioner.layer_stats()["0"]
print(f"layer 0: {stats['method']}, {stats['rows']} rows, damping {opt.damping:.3g}")
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
