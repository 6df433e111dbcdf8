"""``torchrun`` with ``DistributedDataParallel``: the preconditioner on the DDP-wrapped model.

Each layer has one owner rank (greedy, cost-balanced): CG-FAC's owner gathers the rows or reduces the
factor sums (whichever sends fewer bytes), solves and broadcasts the direction, so the direction on
N ranks equals one process's on the global batch. Every rank runs the same code; gloo on CPU, NCCL
on GPUs.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py [--tiny]
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="a small model for one epoch")
args = parser.parse_args()

cuda = torch.cuda.is_available()
# Set the process group's timeout: a rank that dies then ends the others' wait (gloo's default is 30 min).
dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)  # the same data and initial weights on every rank
width, epochs = (32, 1) if args.tiny else (256, 10)
x = torch.randn(2048, 20)
y = (x @ torch.randn(20, 5)).argmax(1)
data = TensorDataset(x, y)
sampler = DistributedSampler(data, shuffle=True, seed=0)  # each rank its share of every epoch
loader = DataLoader(data, batch_size=64, sampler=sampler)  # 64 per rank: a global batch of 64 · world

# --8<-- [start:setup]
model = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 5)).to(device)
ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
pre = cgfac.CGFAC(ddp, damping=1e-3)  # on the wrapped model; every rank builds it

losses = []
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(xb), yb)
        loss.backward()  # DDP averages the gradients over the ranks
        pre.step()  # each layer solved by its owner, the direction shared with every rank
        opt.step()
# --8<-- [end:setup]
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the global batch's loss, for the print
        losses.append(mean.item() / world)

if rank == 0:
    print(f"{world} ranks; layer owners {dict(pre.dist.owners)}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
dist.barrier()  # every rank done before any leaves the group
dist.destroy_process_group()
