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
    "ortho-both-lowrank": {"direction": "ortho", "sides": "both", "power": -0.5, "rank": 4, "factor_every": 1,
                           "eig_every": 1, "ns_dtype": torch.float64},
    "moe-ortho-both": {"direction": "ortho", "sides": "both", "power": -0.5, "ns_dtype": torch.float64,
                       "model": "moe"},
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()


class Experts(nn.Module):
    """Four experts as 3-D parameters (transformers >= 5's layout), run as its "eager" loop."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 6) * 0.5)
        self.down_proj = nn.Parameter(torch.randn(4, 6, 4) * 0.5)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(4):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = nn.functional.linear(hidden[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(torch.tanh(gate) * up, self.down_proj[e]) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out


class MoE(nn.Module):
    """Router (top 2 of 4), experts, head: tokens are independent samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(6, 4, bias=False)
        self.experts = Experts()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, index = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.head(self.experts(x, index, top / top.sum(-1, keepdim=True)))


def moe() -> nn.Module:
    return MoE().double()


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
    for name, variant in VARIANTS.items():
        kwargs = {k: v for k, v in variant.items() if k != "model"}
        make = moe if variant.get("model") == "moe" else mlp
        model = DistributedDataParallel(make())
        opt = cgfac.optim.TransformerKFAC(model, lr=0.05, weight_decay=0.1, **kwargs)
        train(model, opt, [x.chunk(world)[rank] for x in xs], [y.chunk(world)[rank] for y in ys])
        dist.barrier()
        single = make()  # one process on the global batch: a process group of this rank alone
        opt1 = cgfac.optim.TransformerKFAC(single, lr=0.05, weight_decay=0.1, process_group=alone, **kwargs)
        train(single, opt1, xs, ys)
        err = max(float((p - q).abs().max() / q.abs().max()) for p, q in
                  zip(model.module.parameters(), single.parameters()))
        moved = max(float((p - q).abs().max()) for p, q in zip(single.parameters(), make().parameters()))
        result["variants"][name] = {"max_rel_err": err, "moved": moved, "routes": opt.routes}
    # FSDP2: every Linear and the root fully_shard'ed (7 output rows over 2 ranks: uneven shards)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    kwargs = dict(VARIANTS["ortho-both-ema"])
    model = mlp()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = cgfac.optim.TransformerKFAC(model, lr=0.05, weight_decay=0.1, **kwargs)
    train(model, opt, [x.chunk(world)[rank] for x in xs], [y.chunk(world)[rank] for y in ys])
    single = mlp()
    opt1 = cgfac.optim.TransformerKFAC(single, lr=0.05, weight_decay=0.1, process_group=alone, **kwargs)
    train(single, opt1, xs, ys)
    whole = [p.full_tensor() for p in model.parameters()]
    result["variants"]["fsdp2-ortho-both-ema"] = {
        "max_rel_err": max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(whole, single.parameters())),
        "moved": max(float((p - q).abs().max()) for p, q in zip(single.parameters(), mlp().parameters())),
        "routes": {f"module.{k}": v for k, v in opt.routes.items()}, "sharded": type(model[0].weight).__name__}
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
