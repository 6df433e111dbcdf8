"""TransformerKFAC under DDP: two gloo ranks, each on half of the global batch, take the same steps as one
process on the whole batch (factors averaged, or rows gathered, across the ranks; low-rank running
factors from the gathered rows), a mixture-of-experts
model's experts included (each expert's routed rows reduced over the ranks); and under FSDP2
(``fully_shard``: DTensor parameters, uneven shards), the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distributed import torchrun

WORKER = Path(__file__).with_name("tkfac_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tkfac-ddp")
    proc = torchrun(out, worker=WORKER)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("variant", ["ortho-both-ema", "ortho-input-rows", "ekfac", "ortho-both-lowrank",
                                     "moe-ortho-both", "fsdp2-ortho-both-ema"])
def test_ddp_steps_equal_one_process_on_the_global_batch(ranks, variant: str) -> None:
    for result in ranks:
        r = result["variants"][variant]
        assert r["moved"] > 1e-3  # the parameters did move
        assert r["max_rel_err"] < 1e-9, (result["rank"], variant, r)
        if variant.startswith("fsdp2"):
            assert r["sharded"] == "DTensor"
        if variant.startswith("moe"):
            assert r["routes"]["module.experts.gate_up_proj"] == "kron-experts"
            assert r["routes"]["module.router.weight"] == "kron" and r["routes"]["module.head.weight"] == "adamw"
        else:
            assert r["routes"]["module.0.weight"] == "kron" and r["routes"]["module.4.weight"] == "adamw"
