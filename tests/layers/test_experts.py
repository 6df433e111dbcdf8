"""Mixture-of-experts layers (3-D expert parameters, transformers ≥ 5 layout) and routers, against
dense float64 references built without the library: per-token gradients of each expert's slice
by one backward per token (exact curvature), and the per-expert Kronecker blocks from the routed
tokens' inputs and ``retain_grad`` output gradients (``A_e = aᵀa/N_e``, ``G_e = gᵀg/N``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_reference import EXACT_KINDS, KRON_KINDS, exact_direction, kron_direction, library_directions
from torch import Tensor, nn

import cgfac
from cgfac.layers import ExpertsGroup, RouterHelper, experts_helper

E, H, INTER, K, C, N = 4, 8, 4, 2, 6, 14  # widths: multiples of 16 bytes for _grouped_mm


class Router(nn.Module):
    """A top-k router returning ``(logits, scores, indices)``, as transformers' ``...TopKRouter``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H) * 0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x.reshape(-1, H), self.weight)
        probs = logits.softmax(-1)
        top, index = probs.topk(K, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index


class Experts(nn.Module):
    """``gate_up_proj`` ``E × 2I × H`` and ``down_proj`` ``E × H × I`` (``E × d_in × d_out`` when
    ``transposed``; optional biases), run as transformers' ``"eager"`` (a loop of per-expert
    products) or ``"grouped_mm"`` (``torch._grouped_mm`` on tokens sorted by expert)."""

    def __init__(self, impl: str = "eager", transposed: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.impl, self.transposed = impl, transposed
        up, down = (E, 2 * INTER, H), (E, H, INTER)
        if transposed:
            up, down = (E, H, 2 * INTER), (E, INTER, H)
        self.gate_up_proj = nn.Parameter(torch.randn(up) * 0.5)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.5)
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * INTER) * 0.1)
            self.down_proj_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        self.bias = bias
        self.keep: dict[tuple[str, int], tuple[Tensor, Tensor]] | None = None  # the reference's (input, output)

    def _product(self, name: str, e: int, x: Tensor) -> Tensor:
        w = getattr(self, name)[e]
        y = x @ w if self.transposed else F.linear(x, w)
        if self.bias:
            y = y + getattr(self, f"{name}_bias")[e]
        if self.keep is not None:
            y.retain_grad()
            self.keep[(name, e)] = (x.detach(), y)
        return y

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.impl == "grouped_mm":
            return self._grouped(hidden, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        for e in range(E):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = self._product("gate_up_proj", e, hidden[token]).chunk(2, dim=-1)
            y = self._product("down_proj", e, F.silu(gate) * up) * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out

    def _grouped(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        ids, perm = torch.sort(top_k_index.reshape(-1))
        x = hidden[perm // K]
        offs = torch.cumsum(torch.bincount(ids, minlength=E), 0).to(torch.int32)

        def grouped(x: Tensor, w: Tensor) -> Tensor:
            return torch._grouped_mm(x, w if self.transposed else w.transpose(-2, -1), offs=offs)

        gate, up = grouped(x, self.gate_up_proj).chunk(2, dim=-1)
        y = grouped(F.silu(gate) * up, self.down_proj) * top_k_weights.reshape(-1)[perm, None]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].reshape(-1, K, H).sum(1)


class MoE(nn.Module):
    """Tokens are independent samples: router, experts, then a linear head to ``C`` classes."""

    def __init__(self, impl: str = "eager", transposed: bool = False, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = Router()
        self.experts = Experts(impl, transposed, bias)
        self.head = nn.Linear(H, C)

    def forward(self, x: Tensor) -> Tensor:
        _, weights, index = self.gate(x)
        return self.head(self.experts(x, index, weights))


def data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N, H, generator=gen, dtype=dtype), torch.randint(0, C, (N,), generator=gen)


def expert_matrix(experts: Experts, name: str, e: int, grads: dict[str, Tensor] | None = None) -> Tensor:
    """``[W_e, b_e]`` (``d_out × d_in``) of expert ``e`` from gradients by parameter name (or ``.grad``)."""
    w = grads[f"experts.{name}"][e] if grads is not None else getattr(experts, name).grad[e]
    w = w.T if experts.transposed else w
    if not experts.bias:
        return w
    b = grads[f"experts.{name}_bias"][e] if grads is not None else getattr(experts, f"{name}_bias").grad[e]
    return torch.cat([w, b[:, None]], 1)


def test_registration_finds_experts_and_router() -> None:
    model = MoE().double()
    pre = cgfac.CGFAC(model, damping=0.1)
    report = {e.name: e for e in pre.registration_report()}
    assert report["experts"].covered and report["experts"].rule.startswith("probe:experts")
    assert report["gate"].covered and report["gate"].rule.startswith("probe:router")
    names = [n for n in pre.layers if n.startswith("experts.")]
    assert names == [f"experts.{p}:{e}" for p in ("gate_up_proj", "down_proj") for e in range(E)]
    assert isinstance(pre.layers["gate"], RouterHelper)
    shapes = {n: (pre.layers[n].d_out, pre.layers[n].d_in) for n in names}
    assert shapes["experts.gate_up_proj:0"] == (2 * INTER, H) and shapes["experts.down_proj:3"] == (H, INTER)


@pytest.mark.parametrize("transposed", [False, True])
def test_probe_reads_the_layout(transposed: bool) -> None:
    group = experts_helper("experts", Experts("eager", transposed))
    assert isinstance(group, ExpertsGroup)
    assert group.transposed == {"gate_up_proj": transposed, "down_proj": transposed}
    unit = group.by_key[("down_proj", 1)]
    assert (unit.d_out, unit.d_in) == (H, INTER)


def test_probe_refuses_unseen_products() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(E, H, H))

        def forward(self, hidden: Tensor, index: Tensor, weights: Tensor) -> Tensor:
            return torch.einsum("th,ehk->tk", hidden, self.w)  # every expert on every token: no routed products

    reason = experts_helper("opaque", Opaque())
    assert isinstance(reason, str) and "were not seen" in reason


def _reference_rows(model: MoE, x: Tensor, y: Tensor) -> dict[tuple[str, int], tuple[Tensor, Tensor]]:
    """Each expert product's routed input rows and per-token output gradients (summed loss)."""
    model.experts.keep = {}
    F.cross_entropy(model(x), y, reduction="sum").backward()
    kept = {k: (a, out.grad.detach().clone()) for k, (a, out) in model.experts.keep.items()}
    model.experts.keep = None
    model.zero_grad()
    return kept


def _per_token_jacobians(model: MoE, x: Tensor, y: Tensor, name: str, e: int) -> Tensor:
    """``J_t = ∇_{W_e} loss_t`` for every token (zero for tokens not routed to ``e``): ``N × d_out × d_in``."""
    jac = []
    for t in range(N):
        model.zero_grad()
        F.cross_entropy(model(x[t : t + 1]), y[t : t + 1], reduction="sum").backward()
        jac.append(expert_matrix(model.experts, name, e).clone())
    model.zero_grad()
    return torch.stack(jac)


@pytest.mark.parametrize("transposed,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("kind", KRON_KINDS + EXACT_KINDS)
def test_expert_blocks_match_dense_per_expert_fisher(kind: str, transposed: bool, bias: bool) -> None:
    model = MoE("eager", transposed, bias).double()
    x, y = data()
    rows = _reference_rows(model, x, y)
    F.cross_entropy(model(x), y).backward()
    grads = {(name, e): expert_matrix(model.experts, name, e).clone()
             for name in ("gate_up_proj", "down_proj") for e in range(E)}
    model.zero_grad()
    _, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    checked = 0
    for (name, e), grad_m in grads.items():
        if (name, e) not in rows:
            continue
        if "exact" in kind:
            jac = _per_token_jacobians(model, x, y, name, e)
            torch.testing.assert_close(jac.mean(0), grad_m)  # the per-token gradients average to ∇W_e
            want = exact_direction(jac, grad_m)
        else:
            a, g = rows[(name, e)]
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a
            want = kron_direction(a, g, N, grad_m)  # A_e = aᵀa/N_e, G_e = gᵀg/N (N: every token)
        torch.testing.assert_close(expert_matrix(model.experts, name, e, got), want, rtol=1e-6, atol=1e-9)
        checked += 1
    assert checked == 2 * E  # every expert received tokens (the data is chosen so)


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-eigen"])
def test_router_is_a_linear_layer(kind: str) -> None:
    model = MoE().double()
    x, y = data()
    logits = {}

    def keep(module: nn.Module, inputs: tuple, output: tuple) -> None:
        output[0].retain_grad()
        logits["out"] = output[0]

    handle = model.gate.register_forward_hook(keep)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    handle.remove()
    g = logits["out"].grad.clone()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad_w = model.gate.weight.grad.clone()
    model.zero_grad()
    _, got = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    torch.testing.assert_close(got["gate.weight"], kron_direction(x, g, N, grad_w), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-cg"])
def test_grouped_mm_rows_equal_the_eager_loop(kind: str) -> None:
    """``torch._grouped_mm`` has no float64 kernel on CPU: both implementations in float32, same directions."""
    x, y = data(torch.float32)
    out = {}
    for impl in ("eager", "grouped_mm"):
        model = MoE(impl)
        _, out[impl] = library_directions(kind, model, lambda model=model: F.cross_entropy(model(x), y))
    for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
        torch.testing.assert_close(out["grouped_mm"][name], out["eager"][name], rtol=2e-4, atol=1e-6)


def test_expert_without_tokens_keeps_its_plain_gradient_with_reason() -> None:
    model = MoE().double()
    with torch.no_grad():  # expert 3 never wins the routing
        model.gate.weight[3] = -50.0
    x, y = data()
    x = x.abs()
    pre = cgfac.KFAC(model, damping=0.1, inv_update_steps=1, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    plain = model.experts.down_proj.grad[3].clone()
    with pytest.warns(RuntimeWarning, match="down_proj:3"):
        pre.step()
    stats = pre.layer_stats()
    assert "no curvature rows" in stats["experts.down_proj:3"]["fallback"]
    assert "fallback" not in stats["experts.down_proj:0"]
    torch.testing.assert_close(model.experts.down_proj.grad[3], plain)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_transformers_mixtral_experts_are_covered(impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    model.config._experts_implementation = impl
    pre = cgfac.CGFAC(model, damping=0.1)
    plain = [e for e in pre.registration_report() if not e.covered]
    assert plain == []
    x = torch.randint(0, 40, (2, 8))
    model(x, labels=x).loss.backward()
    pre.step()
    stats = pre.layer_stats()
    experts = [n for n in stats if ".experts." in n]
    assert len(experts) == 8 and all("fallback" not in stats[n] for n in experts)


class ListExperts(nn.Module):
    """The same experts as separate ``nn.Linear`` modules (older transformers' ``nn.ModuleList``)."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.gate_up = nn.ModuleList(nn.Linear(H, 2 * INTER, bias=False) for _ in range(E))
        self.down = nn.ModuleList(nn.Linear(INTER, H, bias=False) for _ in range(E))
        with torch.no_grad():
            for e in range(E):
                self.gate_up[e].weight.copy_(experts.gate_up_proj[e])
                self.down[e].weight.copy_(experts.down_proj[e])

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        for e in range(E):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = self.gate_up[e](hidden[token]).chunk(2, dim=-1)
            out = out.index_add(0, token, self.down[e](F.silu(gate) * up) * top_k_weights[token, slot, None])
        return out


# EKFAC's Adam is not invariant to the basis of the factors' null space: float32 rounding differences
# between the grouped and the looped products pick different bases there, so it is compared in float64.
@pytest.mark.parametrize(("impl", "direction"), [("eager", "ortho"), ("eager", "ekfac"), ("grouped_mm", "ortho")])
def test_transformer_kfac_takes_each_expert_as_a_hidden_matrix(impl: str, direction: str) -> None:
    """TransformerKFAC on 3-D experts equals TransformerKFAC on the same experts as separate Linears."""
    dtype = torch.float32 if impl == "grouped_mm" else torch.float64
    model = MoE(impl).to(dtype)
    split = MoE(impl).to(dtype)
    split.experts = ListExperts(model.experts).to(dtype)
    x, y = data(dtype)
    opts = [cgfac.optim.TransformerKFAC(m, lr=0.02, direction=direction, eig_every=2) for m in (model, split)]
    assert opts[0].routes["experts.gate_up_proj"] == "kron-experts" and opts[0].routes["gate.weight"] == "adamw"
    assert opts[1].routes["experts.gate_up.0.weight"] == "kron"
    for _ in range(4):
        for m, opt in zip((model, split), opts):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for e in range(E):
        torch.testing.assert_close(model.experts.gate_up_proj[e], split.experts.gate_up[e].weight, **tol)
        torch.testing.assert_close(model.experts.down_proj[e], split.experts.down[e].weight, **tol)
    torch.testing.assert_close(model.gate.weight, split.gate.weight, **tol)


def test_transformer_kfac_experts_resume_bit_for_bit() -> None:
    x, y = data()

    def run(model: MoE, opt: torch.optim.Optimizer, k: int) -> None:
        for _ in range(k):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    model = MoE().double()
    opt = cgfac.optim.TransformerKFAC(model, lr=0.02, eig_every=2)
    run(model, opt, 3)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    run(model, opt, 3)
    model2 = MoE().double()
    model2.load_state_dict(saved["model"])
    opt2 = cgfac.optim.TransformerKFAC(model2, lr=0.02, eig_every=2)
    opt2.load_state_dict(saved["opt"])
    run(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


class ListMoE(nn.Module):
    """:class:`MoE` with its experts as an ``experts`` ``nn.ModuleList`` of MLPs (older transformers)."""

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Linear(H, 2 * INTER, bias=False)
            self.down_proj = nn.Linear(INTER, H, bias=False)

        def forward(self, x: Tensor) -> Tensor:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)

    class Block(nn.Module):
        def __init__(self, source: Experts) -> None:
            super().__init__()
            self.experts = nn.ModuleList(ListMoE.Expert() for _ in range(E))
            with torch.no_grad():
                for e, expert in enumerate(self.experts):
                    expert.gate_up_proj.weight.copy_(source.gate_up_proj[e])
                    expert.down_proj.weight.copy_(source.down_proj[e])

        def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            out = torch.zeros_like(hidden)
            for e, expert in enumerate(self.experts):
                token, slot = torch.where(top_k_index == e)
                if token.numel():
                    out = out.index_add(0, token, expert(hidden[token]) * top_k_weights[token, slot, None])
            return out

    def __init__(self) -> None:
        super().__init__()
        source = MoE()
        self.gate, self.head = source.gate, source.head
        self.experts = ListMoE.Block(source.experts)

    def forward(self, x: Tensor) -> Tensor:
        _, weights, index = self.gate(x)
        return self.head(self.experts(x, index, weights))


@pytest.mark.parametrize("kind", ["kfac", "cgfac-kron-lowrank", EXACT_KINDS[0]])
def test_module_list_experts_are_the_same_per_expert_blocks(kind: str) -> None:
    """Experts as an ``nn.ModuleList`` of Linears: the same per-expert Fisher blocks (N tokens) as the
    3-D parameters give, so the same directions."""
    x, y = data()
    model, listed = MoE().double(), ListMoE().double()
    _, want = library_directions(kind, model, lambda: F.cross_entropy(model(x), y))
    pre, got = library_directions(kind, listed, lambda: F.cross_entropy(listed(x), y))
    assert all(pre.layers[f"experts.experts.{e}.down_proj"].in_experts for e in range(E))
    for e in range(E):
        torch.testing.assert_close(got[f"experts.experts.{e}.gate_up_proj.weight"],
                                   want["experts.gate_up_proj"][e], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(got[f"experts.experts.{e}.down_proj.weight"],
                                   want["experts.down_proj"][e], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got["gate.weight"], want["gate.weight"], rtol=1e-7, atol=1e-10)
