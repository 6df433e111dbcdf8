"""One rank of the TransformerKFAC DDP check (launched by torchrun from test_transformer_kfac_ddp.py):
three DDP steps on each rank's half of a global batch against one process on the whole batch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cgfac

VARIANTS = {
    "ortho-both-ema": {"direction": "ortho", "sides": "both", "power": -0.5, "ns_dtype": torch.float64},
    "ortho-input-rows": {"direction": "ortho", "sides": "input", "power": -0.5, "factors": "rows",
                         "ns_dtype": torch.float64},
    "ekfac": {"direction": "ekfac", "sides": "both", "eig_every": 1},
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def train(model: nn.Module, opt: torch.optim.Optimizer, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    for x, y in zip(xs, ys):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(16, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(0, 3, (16,), generator=gen) for _ in range(3)]
    result: dict = {"rank": rank, "variants": {}}
    alone = [dist.new_group([r]) for r in range(world)][rank]
    for name, kwargs in VARIANTS.items():
        model = DistributedDataParallel(mlp())
        opt = cgfac.optim.TransformerKFAC(model, lr=0.05, weight_decay=0.1, **kwargs)
        train(model, opt, [x.chunk(world)[rank] for x in xs], [y.chunk(world)[rank] for y in ys])
        dist.barrier()
        single = mlp()  # one process on the global batch: a process group of this rank alone
        opt1 = cgfac.optim.TransformerKFAC(single, lr=0.05, weight_decay=0.1, process_group=alone, **kwargs)
        train(single, opt1, xs, ys)
        err = max(float((p - q).abs().max() / q.abs().max()) for p, q in
                  zip(model.module.parameters(), single.parameters()))
        moved = max(float((p - q).abs().max()) for p, q in zip(single.parameters(), mlp().parameters()))
        result["variants"][name] = {"max_rel_err": err, "moved": moved, "routes": opt.routes}
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
