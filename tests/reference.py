"""Dense references built independently of the library (float64, tiny models).

* rows ``a`` by explicit patch slicing (no ``F.unfold``), rows ``g`` as per-sample output
  gradients of a summed loss (``retain_grad`` on the layer output);
* factors ``A = aᵀa/(nT)``, ``G = gᵀg/n`` and the dense damped system through ``torch.kron``;
* the exact empirical Fisher from per-sample gradients with ``torch.func.vmap(grad)``.

Vectorisation is column-major: ``vec(V) = Vᵀ.flatten()``, so ``vec(G V A) = (A ⊗ G) vec(V)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]  # mean-reduced loss(outputs, targets)


@dataclass
class Case:
    """A model, its inputs and a mean-reduced loss."""

    name: str
    make_model: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    loss: LossFn
    per_row: bool = False  # a position-wise model whose loss averages over every leading position

    @property
    def loss_terms(self) -> int:
        """How many per-sample terms the mean-reduced loss averages."""
        return self.x.shape[0] * (self.x.shape[1] if self.per_row else 1)

    def samples(self) -> tuple[Tensor, Tensor]:
        """Inputs and targets with one sample per loss term."""
        if not self.per_row:
            return self.x, self.y
        return self.x.reshape(-1, self.x.shape[-1]), self.y.reshape(-1, self.y.shape[-1])


def covered(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def has_bias(m: nn.Module) -> bool:
    return m.bias is not None


def patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Rows of a conv input, one per output location, by explicit slicing: ``(n·T, C·kh·kw)``."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    n, _, h, w = xp.shape
    h_out = (h - dh * (kh - 1) - 1) // sh + 1
    w_out = (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(h_out):
        for j in range(w_out):
            win = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(win.reshape(n, -1))
    return torch.stack(rows, dim=1).reshape(n * h_out * w_out, -1)


def capture(case: Case, model: nn.Module) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Per layer: rows ``a`` (ones column if bias), per-sample output gradients ``g``, ``n``."""
    inputs, outputs = {}, {}
    layers = covered(model)
    handles = []
    for name, m in layers.items():
        def hook(mod, inp, out, name=name):
            inputs[name] = inp[0].detach()
            out.retain_grad()
            outputs[name] = out
        handles.append(m.register_forward_hook(hook))
    n = case.x.shape[0]
    loss = case.loss(model(case.x), case.y) * case.loss_terms  # summed: per-sample output grads
    loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    result = {}
    for name, m in layers.items():
        x, go = inputs[name], outputs[name].grad
        if isinstance(m, nn.Conv2d):
            a = patches(x, m)
            g = go.flatten(2).transpose(1, 2).reshape(-1, go.shape[1])
        else:
            a = x.reshape(-1, x.shape[-1])
            g = go.reshape(-1, go.shape[-1])
        if has_bias(m):
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        samples = n if isinstance(m, nn.Conv2d) else a.shape[0]
        result[name] = (a, g, samples)
    return result


def factors(a: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``A = aᵀa/(nT)`` (``nT`` = rows), ``G = gᵀg/n``."""
    return a.T @ a / a.shape[0], g.T @ g / n


def vec(v: Tensor) -> Tensor:
    return v.T.reshape(-1)


def unvec(v: Tensor, shape: tuple[int, int]) -> Tensor:
    return v.reshape(shape[1], shape[0]).T


def dense_kron(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    return torch.kron(a_factor, g_factor)


def layer_matrix(m: nn.Module, tensors: dict[str, Tensor], prefix: str) -> Tensor:
    w = tensors[f"{prefix}weight"]
    w = w.flatten(-3) if isinstance(m, nn.Conv2d) else w
    if has_bias(m):
        w = torch.cat([w, tensors[f"{prefix}bias"].unsqueeze(-1)], dim=-1)
    return w


def per_sample_grads(case: Case, model: nn.Module) -> dict[str, Tensor]:
    """Per layer: ``J_s = ∂ℓ_s/∂W`` for every sample, ``(n, d_out, d_in)`` (bias last column)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, y):
        return case.loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, *case.samples())
    out = {}
    for name, m in covered(model).items():
        prefix = f"{name}." if name else ""
        out[name] = layer_matrix(m, grads, prefix)
    return out


def exact_fisher(jac: Tensor) -> Tensor:
    """``F = (1/n) Σ_s vec(J_s) vec(J_s)ᵀ`` (column-major vec)."""
    flat = jac.transpose(1, 2).reshape(jac.shape[0], -1)
    return flat.T @ flat / jac.shape[0]


def mean_grad(case: Case, model: nn.Module) -> dict[str, Tensor]:
    """``∇W`` of the mean-reduced loss for every covered layer (grads left in ``.grad``)."""
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    out = {}
    for name, m in covered(model).items():
        prefix = f"{name}." if name else ""
        tensors = {f"{prefix}weight": m.weight.grad}
        if has_bias(m):
            tensors[f"{prefix}bias"] = m.bias.grad
        out[name] = layer_matrix(m, tensors, prefix).clone()
    return out


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def mse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).pow(2).sum(-1).mean()


def cases() -> list[Case]:
    """Tiny float64 models: MLPs with and without bias, leading dims, CNNs (stride/pad/dilation)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def labels(n, c, *extra):
        return torch.randint(0, c, (n, *extra), generator=gen)

    return [
        Case("mlp-bias", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
             rand(7, 5), labels(7, 3), ce),
        Case("mlp-nobias", lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(),
                                                 nn.Linear(4, 3, bias=False)),
             rand(6, 5), labels(6, 3), ce),
        Case("linear-seq", lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
             rand(3, 4, 4), rand(3, 4, 2), mse, per_row=True),
        Case("cnn-stride-pad", lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 3)),
             rand(4, 2, 5, 5), labels(4, 3), ce),
        Case("cnn-dilation-nobias", lambda: nn.Sequential(
            nn.Conv2d(2, 2, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
            nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 3, 3, bias=False)),
             rand(3, 2, 5, 4), labels(3, 3), ce),
    ]


def double_model(case: Case) -> nn.Module:
    """``case``'s model in float64, its parameters drawn from seed 0."""
    torch.manual_seed(0)
    return case.make_model().double()


def library_rows(case: Case, model: nn.Module) -> dict:
    """Rows captured by the library's hooks on one forward/backward of the mean-reduced loss."""
    import cgfac

    pre = cgfac.CGFAC(model)
    model.zero_grad()
    case.loss(model(case.x), case.y).backward()
    rows = {name: pre._rows(helper) for name, helper in pre.layers.items()}
    pre.remove()
    return rows
