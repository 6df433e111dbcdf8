"""Why grafted CG-FAC with few rows diverges on the wide MLP (issue 16): measured on mlp-wide.

Per step and layer: the share of the direction X's squared norm outside the span of its rows
(``‖X − P_G X P_A‖² / ‖X‖²``, ``P = QQᵀ`` from the QR of the rows), and the largest entry of the
grafted step against the largest entry of RMSProp's own step (same length by construction).
Run: PYTHONPATH=src .venv/bin/python benchmarks/graft-diagnosis/diagnose.py > benchmarks/graft-diagnosis/result.txt
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cgfac
from cgfac_bench.models import build_model
from cgfac_bench.train import load_task_data

torch.manual_seed(0)
WIDTH, BATCH, ROWS, DAMPING, LR, STEPS = 1024, 256, 64, 1e-3, 1e-3, 30
data = load_task_data("mlp-wide")
model = build_model("mlp-wide", width=WIDTH)
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
pre = cgfac.CGFAC(model, solver="lowrank", curvature_samples=ROWS, damping=DAMPING, kl_clip=None, graft="rmsprop")
gen = torch.Generator().manual_seed(0)
print(f"mlp-wide width {WIDTH}, batch {BATCH}, {ROWS} rows, damping {DAMPING}, SGD lr {LR} momentum 0.9, grafted")
print("step  loss    outside-span share of |X|^2 (per layer)     max|grafted step| / max|RMSProp step| (per layer)")
for step in range(STEPS):
    idx = torch.randint(0, data["train_x"].shape[0], (BATCH,), generator=gen)
    x, y = data["train_x"][idx], data["train_y"][idx]
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: h.grad_matrix().clone() for n, h in pre.layers.items()}
    pre.step()
    shares, peaks = [], []
    for name, helper in pre.layers.items():
        x_dir, g = helper.grad_matrix(), grads[name]
        rows = pre.windows[name].batches[0]
        qa, _ = torch.linalg.qr(rows.a.T)
        qg, _ = torch.linalg.qr(rows.g.T)
        inside = qg @ (qg.T @ x_dir @ qa) @ qa.T
        shares.append(float((x_dir - inside).square().sum() / x_dir.square().sum()))
        graft = pre.states[name].graft
        v_hat = graft.v / (1 - pre.graft_beta2 ** graft.steps)
        rms_step = g / (v_hat.sqrt() + pre.graft_eps)
        peaks.append(float(x_dir.abs().max() / rms_step.abs().max()))
    opt.step()
    if step % 3 == 0 or step == STEPS - 1:
        print(f"{step:4d}  {loss.item():6.3f}  " + " ".join(f"{s:.3f}" for s in shares) + "     "
              + " ".join(f"{p:7.1f}" for p in peaks))
