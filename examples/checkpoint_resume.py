"""Checkpoint every step, resume on another number of processes.

Across processes each layer's curvature lives on its owner rank, so one rank's ``pre.state_dict()``
is only part of the state: ``cgfac.checkpoint.full_state_dict(pre)`` (a collective: every rank calls
it) gathers it into one state that loads on any number of processes, and
``cgfac.checkpoint.save_atomic`` never leaves a truncated file. Each step's global batch is the same
whatever the number of processes, so a run saved on 2 ranks and resumed on 1 continues as an
uninterrupted run would (up to rounding). Saving ``{model, optimizer, preconditioner, step}`` in one
file after each step also makes ``torchrun --max-restarts`` resume with no step lost or repeated.

    torchrun --standalone --nproc_per_node 2 examples/checkpoint_resume.py --ckpt ckpt.pt --steps 4
    python examples/checkpoint_resume.py --ckpt ckpt.pt --steps 8      # one process: steps 4 to 7
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="the checkpoint file: loaded if it exists, saved every step")
parser.add_argument("--steps", type=int, default=8, help="train until this step")
parser.add_argument("--width", type=int, default=64)
args = parser.parse_args()

distributed = "RANK" in os.environ  # launched by torchrun
if distributed:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x @ torch.randn(20, 5)).argmax(1)
model = nn.Sequential(nn.Linear(20, args.width), nn.ReLU(), nn.Linear(args.width, 5))
trained = DistributedDataParallel(model) if distributed else model
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
pre = cgfac.CGFAC(trained, damping=1e-2, solver="lowrank", curvature_window=2)

# --8<-- [start:resume]
start = 0
if os.path.exists(args.ckpt):
    saved = torch.load(args.ckpt, weights_only=True)  # only tensors and plain values
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    pre.load_state_dict(saved["pre"])  # each rank keeps its own layers once the next step assigns owners
    start = saved["step"]
    if rank == 0:
        print(f"resumed at step {start} on {world} process(es)")

for step in range(start, args.steps):
    batch = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
    xb, yb = x[batch].chunk(world)[rank], y[batch].chunk(world)[rank]  # this rank's part of the global batch
    opt.zero_grad()
    loss = nn.functional.cross_entropy(trained(xb), yb)
    loss.backward()
    pre.step()
    opt.step()
    mean = loss.detach().clone()
    if distributed:
        dist.all_reduce(mean)
    state = cgfac.checkpoint.full_state_dict(pre)  # every rank; rank 0 receives the whole state
    if rank == 0:
        print(f"step {step} loss {mean.item() / world:.6f}")
        cgfac.checkpoint.save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "pre": state,
                                      "step": step + 1}, args.ckpt)
# --8<-- [end:resume]
if distributed:
    dist.barrier()  # rank 0's last save done before any rank leaves the group
    dist.destroy_process_group()
