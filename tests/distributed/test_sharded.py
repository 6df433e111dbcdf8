"""FSDP2 (``fully_shard``) on 2 gloo CPU processes: sharded gradients are preconditioned as the
unsharded single-process run on the global batch (float64), by the owner scheme (each layer's
owner alone gathers its gradient rows and returns each rank its rows of the direction) or by
the all-gather it falls back to; see ``cgfac.distributed.sharded``."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import fsdp_worker as fw
import pytest
import torch
from torch import nn

import cgfac
from cgfac.distributed.sharded import chunk_rows, row_layout

WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1",
       "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
       **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
OWNER = "owner: rank"


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


def assert_matches(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert len(got["directions"]) == len(want["directions"])
    for step, (g, w) in enumerate(zip(got["directions"], want["directions"])):
        assert rel_err(g, w) < tol, (step, rel_err(g, w))
    assert rel_err(got["params"], want["params"]) < tol


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", list(fw.PRECONDITIONERS))
def test_fsdp2_owner_scheme_matches_the_unsharded_single_process(ranks, kind: str) -> None:
    want = fw.train(kind, 0, 1)
    for result in ranks:
        got = result["owner"][kind]
        assert got["sharded"]
        assert all(route.startswith(OWNER) for route in got["routes"].values()), got["routes"]
        assert got["fallbacks"] == 0
        assert_matches(got, want)


def expected_owner_numbers(run: dict, rank: int, world: int = 2) -> int:
    """Numbers the owner scheme brings to ``rank`` per step: the other ranks' rows of the layers it
    owns (gradient), and its own rows of every other layer with a 2-number header (direction)."""
    total = 0
    for name, parts in run["units"].items():
        mine = 0
        whole = 0
        for shape, rows in parts:
            lo, hi = (0, shape[0]) if rows is None else rows
            start, stop = chunk_rows(shape[0], world)[rank]
            width = math.prod(shape[1:])
            mine += max(0, min(hi, stop) - max(lo, start)) * width
            whole += (hi - lo) * width
        total += whole - mine if run["owners"][name] == rank else 2 + mine
    return total


def expected_all_gather_numbers(run: dict, rank: int, world: int = 2) -> int:
    """Numbers ``full_tensor`` brings to ``rank`` per step: the other ranks' rows of every parameter
    (of a model whose units share no parameter)."""
    total = 0
    for parts in run["units"].values():
        for shape, _ in parts:
            start, stop = chunk_rows(shape[0], world)[rank]
            total += math.prod(shape) - (stop - start) * math.prod(shape[1:])
    return total


@pytest.mark.parametrize("kind", list(fw.PRECONDITIONERS))
def test_the_owner_scheme_brings_no_rank_the_gradient_of_a_layer_it_does_not_own(ranks, kind: str) -> None:
    """No ``full_tensor`` (all-gather) in ``pre.step()``, and exactly the owned layers' other rows
    plus this rank's rows of the other layers' directions arrive; every rank owns some layer."""
    for rank, result in enumerate(ranks):
        run = result["owner"][kind]
        assert set(run["owners"].values()) == {0, 1}
        want = expected_owner_numbers(run, rank)
        for comm in run["comm"]:
            assert comm["full_tensor"] == 0 and comm["full_numbers"] == 0
            assert comm["a2a_numbers"] == want, (comm, want)
        assert want != expected_all_gather_numbers(run, rank)


@pytest.mark.parametrize("kind", ["cgfac-lowrank", "kfac-mem-opt"])
def test_all_gather_mode_gathers_every_layer_and_matches(ranks, kind: str) -> None:
    want = fw.train(kind, 0, 1)
    for rank, result in enumerate(ranks):
        got = result["all-gather"][kind]
        assert all(route == "all-gather: sharded_grads='all-gather'" for route in got["routes"].values())
        for comm in got["comm"]:
            assert comm == {"full_tensor": 6, "full_numbers": expected_all_gather_numbers(got, rank), "a2a_numbers": 0}
        assert_matches(got, want)


def test_fsdp2_shards_are_uneven_and_local(ranks) -> None:
    """Conv (3 output channels) shards as 2 + 1 rows, Linear(48, 8) as 4 + 4: each rank wrote only its rows."""
    rows = [result["owner"]["kfac-comm-opt"]["local_rows"] for result in ranks]
    assert rows[0][:2] == [2, 2] and rows[1][:2] == [1, 1]
    assert rows[0][2] == rows[1][2] == 4


@pytest.mark.parametrize("kind", ["cgfac-lowrank", "kfac-comm-opt"])
def test_uneven_shards_and_a_layer_with_fewer_rows_than_ranks(ranks, kind: str) -> None:
    """Rows 3 (2 + 1), 5 (3 + 2), 1 (1 + 0: rank 1 holds none of Linear(5, 1)) and 4 (2 + 2)."""
    want = fw.train(kind, 0, 1, model_name="uneven")
    rows = [result["uneven"][kind]["local_rows"] for result in ranks]
    assert rows == [[2, 2, 3, 3, 1, 1, 2, 2], [1, 1, 2, 2, 0, 0, 2, 2]]
    for rank, result in enumerate(ranks):
        got = result["uneven"][kind]
        assert all(route.startswith(OWNER) for route in got["routes"].values())
        assert all(comm["a2a_numbers"] == expected_owner_numbers(got, rank) for comm in got["comm"])
        assert_matches(got, want)


@pytest.mark.parametrize("kind", ["cgfac-lowrank", "kfac-mem-opt"])
def test_embedding_attention_and_norm_layers_under_the_owner_scheme(ranks, kind: str) -> None:
    """The embedding's shards are columns of its layer matrix; attention's packed in-projection (18
    rows, 9 + 9) has k_proj's rows 6..12 on both ranks; LayerNorm's (weight, bias) are 3 + 3."""
    want = fw.train(kind, 0, 1, model_name="seq", steps=2)
    for rank, result in enumerate(ranks):
        got = result["seq"][kind]
        assert set(got["routes"]) == {"emb", "att:q_proj", "att:k_proj", "att:v_proj", "att.out_proj", "norm", "out"}
        assert all(route.startswith(OWNER) for route in got["routes"].values())
        assert got["fallbacks"] == 0  # attention's rows are captured from FSDP2's unsharded weights
        assert got["units"]["att:k_proj"] == [((18, 6), (6, 12)), ((18,), (6, 12))]
        assert all(comm["a2a_numbers"] == expected_owner_numbers(got, rank) for comm in got["comm"])
        assert_matches(got, want)


def test_a_layer_sharded_by_columns_falls_back_to_the_all_gather(ranks) -> None:
    """``shard_placement_fn`` puts Linear(48, 8)'s weight as ``Shard(1)``: that layer is all-gathered
    (2 ``full_tensor`` calls: weight and bias), the others go by the owner scheme; same directions."""
    want = fw.train("kfac-comm-opt", 0, 1, steps=2)
    for result in ranks:
        got = result["columns"]
        assert got["routes"]["3"].startswith("all-gather: weight gradient placements (Shard(dim=1),)")
        assert got["routes"]["0"].startswith(OWNER) and got["routes"]["5"].startswith(OWNER)
        assert all(comm["full_tensor"] == 2 for comm in got["comm"])
        assert_matches(got, want)


def test_owner_mode_names_the_layer_it_cannot_serve(ranks) -> None:
    for result in ranks:
        message = result["owner_error"]
        assert "sharded_grads='owner'" in message and "layer '3'" in message and "Shard(dim=1)" in message


@pytest.mark.parametrize("kind", list(fw.TRUE_FISHER))
def test_true_fisher_under_fsdp2_matches_one_process_with_the_same_targets(ranks, kind: str) -> None:
    want = fw.true_fisher(kind, 0, 2)
    for result in ranks:
        got = result["true_fisher"][kind]
        assert got["fallbacks"] == 0
        assert_matches(got, want)


def test_the_optimizer_class_without_its_quadratic_model_under_fsdp2(ranks) -> None:
    want = fw.optimizer(0, 1)
    for result in ranks:
        assert_matches(result["optim"], want)


def test_the_optimizer_class_refuses_its_quadratic_model_under_fsdp2(ranks) -> None:
    for result in ranks:
        message = result["adaptive_error"]
        assert message.startswith("adaptive='lr+momentum'") and "DTensor" in message and "adaptive='none'" in message


def resume_one_step(kind: str, params: list[torch.Tensor], state: dict) -> list[torch.Tensor]:
    """One process: the model at ``params``, the preconditioner from ``state``, step ``STEPS``."""
    model = fw.net()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    pre = fw.PRECONDITIONERS[kind](model)
    pre.load_state_dict(state)
    x, y = fw.MODELS["net"][1](fw.STEPS)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", list(fw.PRECONDITIONERS))
def test_full_state_dict_under_fsdp2_resumes_the_single_process_run(ranks, kind: str) -> None:
    """The preconditioner state gathered from the owners of an FSDP2 run (K-FAC comm-opt's
    decompositions live on the owners only under the owner scheme) continues as the
    single-process run continues."""
    want_run = fw.train(kind, 0, 1)
    want = resume_one_step(kind, want_run["params"], want_run["state"])
    for result in ranks:
        run = result["owner"][kind]
        assert run["state"]["full"] and run["state"]["world_size"] == 2
        assert rel_err(resume_one_step(kind, run["params"], run["state"]), want) < 1e-9


# --- one process --------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", range(0, 12))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_chunk_rows_are_torch_chunks(rows: int, world: int) -> None:
    sizes = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
    sizes += [0] * (world - len(sizes))
    layout = chunk_rows(rows, world)
    assert [stop - start for start, stop in layout] == sizes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(layout))


def test_row_layout_of_a_plain_tensor_names_the_reason() -> None:
    assert row_layout(torch.zeros(3, 2), [0, 1], 0) == "not a DTensor"


def test_sharded_grads_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="sharded_grads"):
        cgfac.KFAC(fw.net(), sharded_grads="scatter")
    with pytest.raises(TypeError, match="sharded_grads"):
        cgfac.CGFAC(fw.net(), sharded_grads=1)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(5, 3), lambda: nn.Linear(5, 3, bias=False), lambda: nn.Conv2d(2, 4, 3),
    lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.Embedding(7, 3), lambda: nn.LayerNorm(4),
    lambda: nn.MultiheadAttention(4, 2)], ids=["linear", "linear-nobias", "conv", "conv-groups", "embedding",
                                              "layernorm", "attention"])
def test_layer_matrix_from_parameter_rows_round_trips(make) -> None:
    """``matrix_from_parts`` of each unit's parameter rows is ``grad_matrix()``, ``parts_of_matrix``
    inverts it, and ``set_grad`` writes exactly those rows (what the owner scheme moves)."""
    torch.manual_seed(0)
    module = make().double()
    pre = cgfac.KFAC(nn.Sequential(module))
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    for unit in pre.layers.values():
        rows = [p.grad if sl is None else p.grad[sl] for p, sl in unit.grad_parts()]
        m = unit.matrix_from_parts(rows)
        assert m.shape == (unit.d_out, unit.d_in)
        assert torch.equal(m, unit.grad_matrix())
        assert all(torch.equal(a, b) for a, b in zip(unit.parts_of_matrix(m), rows))
        x = torch.randn_like(m)
        unit.set_grad(x)
        assert torch.equal(unit.grad_matrix(), x)
