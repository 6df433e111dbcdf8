"""The plain loop: a preconditioner between ``loss.backward()`` and any optimizer's ``step()``.

``pre.step()`` rewrites the ``.grad`` of every covered layer with its natural-gradient direction;
the optimizer (here SGD with momentum) keeps its momentum, weight decay and schedule.

    python examples/preconditioner_loop.py            # CG-FAC
    python examples/preconditioner_loop.py --kfac     # standard K-FAC
    python examples/preconditioner_loop.py --tiny     # a few seconds (what the tests run)
"""

import argparse

import torch
from torch import nn

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kfac", action="store_true", help="standard K-FAC instead of CG-FAC")
parser.add_argument("--tiny", action="store_true", help="a small model for two epochs")
args = parser.parse_args()

torch.manual_seed(0)
width, epochs = (32, 2) if args.tiny else (256, 10)
x = torch.randn(2048, 20)
y = (x @ torch.randn(20, 5)).argmax(1)  # a teacher's labels: learnable
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True)

model = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 5))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
if args.kfac:
    pre = cgfac.KFAC(model, damping=1e-3, factor_decay=0.95, inv_update_steps=10)
else:  # the lr may be a callable: the preconditioner's KL clip follows the optimizer's schedule
    pre = cgfac.CGFAC(model, damping=1e-3, lr=lambda step: opt.param_groups[0]["lr"])

losses = []
for _ in range(epochs):
    for xb, yb in loader:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        pre.step()  # between backward and the optimizer's step
        opt.step()
        losses.append(loss.item())

print(pre.layer_stats()["0"])  # method, rows, damping (and CG iterations/residual when CG ran)
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
