"""``torchrun`` with FSDP2 (``fully_shard``): build the preconditioner *after* sharding.

Parameters and gradients are ``DTensor`` shards. By default (``sharded_grads="auto"``) each layer's
owner receives the rows of its layers' gradients and returns each rank its rows of the direction:
two all-to-alls per step, no rank ever holds every full gradient. The optimizer sees the sharded
parameters as usual.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_torchrun.py [--tiny]
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import cgfac

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="a small model, few steps")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
mesh = init_device_mesh(device.type, (world,))

torch.manual_seed(0)  # the same data and initial weights on every rank
width, steps = (32, 10) if args.tiny else (512, 200)
x = torch.randn(2048, 20)
y = (x @ torch.randn(20, 5)).argmax(1)

# --8<-- [start:setup]
model = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 5)).to(device)
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer, mesh=mesh)  # each layer its own unit ...
fully_shard(model, mesh=mesh)  # ... and the root
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
pre = cgfac.KFAC(model, damping=1e-3, inv_update_steps=5)  # after fully_shard: it reads the shards
# --8<-- [end:setup]

losses = []
for step in range(steps):
    batch = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
    xb, yb = x[batch].chunk(world)[rank].to(device), y[batch].chunk(world)[rank].to(device)  # this rank's part
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()  # FSDP2 reduce-scatters the gradients: each rank holds its rows
    pre.step()  # owners solve; each rank gets its rows of the direction
    opt.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)

if rank == 0:
    print(f"{world} ranks; routes {({n: s.get('sharded', '') for n, s in pre.layer_stats().items()})}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
dist.barrier()  # every rank done before any leaves the group
dist.destroy_process_group()
