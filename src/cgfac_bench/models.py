"""The benchmark models.

* ``autoencoder``: the classic K-FAC benchmark (Hinton & Salakhutdinov 2006; Martens & Grosse
  2015), 784-1000-500-250-30-250-500-1000-784, sigmoid units, linear code layer; its loss is
  the Bernoulli cross-entropy of the output logits summed over pixels, averaged over the batch.
* ``autoencoder-tanh``, ``autoencoder-sparse``: the same network as the literature trains it: tanh
  units with Glorot initialisation (kfac-jax), or sigmoid units with sparse initialisation (Martens 2010).
* ``mlp``: an MNIST classifier 784-512-256-10 with ReLU.
* ``cnn``: a small MNIST CNN, conv(1→16, 5×5, pad 2)-ReLU-maxpool-conv(16→32, 5×5, pad 2)-ReLU-
  maxpool-linear(32·7·7→10).
* ``digits``: a classifier for scikit-learn's 8×8 digits, 64-64-10 with tanh (quick runs).
* ``transformer``: a small decoder-only byte-level transformer LM (:func:`transformer_lm`) for
  :func:`cgfac_bench.data.load_stdlib_text`; input ``(batch, 128)`` int64 bytes, output logits
  ``(batch, 128, 256)``.
* ``cnn-norm``: an MNIST CNN with BatchNorm, GroupNorm and a depthwise-separable block
  (:func:`cnn_norm`).
* ``autoencoder-wide``: ``autoencoder-tanh`` with its hidden widths (not the 784 pixels, not the
  30-unit code) multiplied by ``width_mult`` (default 4: 784-4000-2000-1000-30-1000-2000-4000-784,
  26.3 M parameters), :func:`wide_widths`.
* ``mlp-wide``: an MNIST classifier with ``depth`` ReLU hidden layers of ``width`` units
  (default 3 × 2048: 784-2048-2048-2048-10), :func:`mlp_wide`.

:func:`build_model` passes its keyword options (``width_mult``, ``width``) to the wide models.
* ``gpt2``: a Hugging Face ``GPT2LMHeadModel`` (tied embeddings, 7.5 M parameters) for the same
  text, :func:`cgfac_bench.hf.gpt2_lm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def wide_widths(width_mult: float = 4) -> tuple[int, ...]:
    """The autoencoder's widths with every hidden width but the 30-unit code times ``width_mult``
    (rounded; the 784 pixels and the code stay)."""
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or not width_mult > 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    code = len(AUTOENCODER_WIDTHS) // 2
    return tuple(w if i in (0, code, len(AUTOENCODER_WIDTHS) - 1) else max(1, round(w * width_mult))
                 for i, w in enumerate(AUTOENCODER_WIDTHS))


def autoencoder(activation: str = "sigmoid", init: str = "default",
                widths: Sequence[int] = AUTOENCODER_WIDTHS) -> nn.Sequential:
    """The deep autoencoder; ``activation`` "sigmoid" | "tanh", ``init`` "default" (PyTorch's
    ``U(±1/√fan_in)``), "glorot" (Glorot-uniform weights with the activation's gain, zero biases:
    kfac-jax's and TensorFlow K-FAC's examples) or "sparse" (Martens 2010: 15 non-zero ``N(0, 1)``
    incoming weights per unit, zero biases); ``widths`` of the layers (symmetric, the code layer in
    the middle is linear)."""
    layers: list[nn.Module] = []
    code = len(widths) // 2  # index of the 30-unit code layer's output
    for i, (d_in, d_out) in enumerate(pairwise(widths)):
        linear = nn.Linear(d_in, d_out)
        if init == "glorot":
            gain = nn.init.calculate_gain(cast(Literal["sigmoid", "tanh"], activation))
            nn.init.xavier_uniform_(linear.weight, gain=gain)
            nn.init.zeros_(linear.bias)
        elif init == "sparse":
            with torch.no_grad():
                linear.weight.zero_()
                linear.bias.zero_()
                k = min(15, d_in)
                for row in range(d_out):
                    linear.weight[row, torch.randperm(d_in)[:k]] = torch.randn(k)
        elif init != "default":
            raise ValueError(f"init must be 'default', 'glorot' or 'sparse', got {init!r}")
        layers.append(linear)
        if i + 1 != code and i + 1 != len(widths) - 1:
            layers.append({"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]())
    return nn.Sequential(*layers)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def mlp_wide(width: int = 2048, depth: int = 3) -> nn.Sequential:
    """MNIST classifier 784-width×depth-10 with ReLU (PyTorch's default initialisation)."""
    for arg, value in (("width", width), ("depth", depth)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in pairwise((784, *([width] * depth))):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def digits_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: ``h + attn(ln1(h))`` with a causal mask, then ``h + mlp(ln2(h))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class TransformerLM(nn.Module):
    """Decoder-only LM: token + learned position embeddings, ``depth`` pre-norm blocks, a final
    LayerNorm and an untied output layer (so every parameter has its own Kronecker block)."""

    causal_mask: Tensor  # a buffer (``register_buffer``)

    def __init__(self, vocab: int = 256, context: int = 128, width: int = 128, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)  # True: masked
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.ln(h))


def transformer_lm(vocab: int = 256, context: int = 128, width: int = 128, depth: int = 2,
                   heads: int = 4) -> TransformerLM:
    """A small decoder-only transformer; logits ``(batch, t, vocab)`` for int64 tokens ``(batch, t)``."""
    return TransformerLM(vocab, context, width, depth, heads)


class NanoBlock(nn.Module):
    """nanoGPT's block: ``h + attn(ln_1(h))``, ``h + mlp(ln_2(h))``; LayerNorms and Linears without bias,
    one ``c_attn`` Linear for q, k, v, causal scaled-dot-product attention, a GELU MLP of width ×4."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.attn_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        b, t, c = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return h + self.mlp(self.ln_2(h))

    def mlp(self, h: Tensor) -> Tensor:
        return self.mlp_proj(F.gelu(self.c_fc(h)))


class NanoExperts(nn.Module):
    """``experts`` GELU MLPs as 3-D parameters (transformers ≥ 5's layout): ``c_fc`` ``E × hidden × width``,
    ``mlp_proj`` ``E × width × hidden``, run as its ``"eager"`` loop (a product per expert on its tokens)."""

    def __init__(self, width: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.c_fc = nn.Parameter(torch.empty(experts, hidden, width))
        self.mlp_proj = nn.Parameter(torch.empty(experts, width, hidden))

    def forward(self, h: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(h)
        for e in range(self.c_fc.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = F.linear(F.gelu(F.linear(h[token], self.c_fc[e])), self.mlp_proj[e])
            out = out.index_add(0, token, y * top_k_weights[token, slot, None])
        return out


class NanoMoE(nn.Module):
    """A mixture-of-experts MLP: a linear router, top-``k`` of ``experts`` GELU experts (weights: the
    softmax of the chosen logits), and Switch's load-balancing loss ``E·Σ_e f_e P_e`` (``f_e`` the
    share of routed slots, ``P_e`` the mean router probability) kept in ``aux_loss``."""

    def __init__(self, width: int, experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = NanoExperts(width, hidden, experts)
        self.aux_loss = torch.zeros(())

    def forward(self, h: Tensor) -> Tensor:
        x = h.reshape(-1, h.shape[-1])
        logits = self.router(x)
        top, index = logits.topk(self.top_k, dim=-1)
        probs = logits.softmax(-1)
        share = F.one_hot(index, logits.shape[-1]).float().mean((0, 1))
        self.aux_loss = logits.shape[-1] * (share * probs.mean(0)).sum()
        return self.experts(x, index, top.softmax(-1)).reshape(h.shape)


class NanoBlockMoE(NanoBlock):
    """:class:`NanoBlock` with its MLP a :class:`NanoMoE` (experts of width ``2·width``, top 2 of 4:
    the dense block's active MLP width ``4·width``)."""

    def __init__(self, width: int, heads: int, experts: int = 4, top_k: int = 2) -> None:
        super().__init__(width, heads)
        del self.c_fc, self.mlp_proj
        self.moe = NanoMoE(width, experts, top_k, 4 * width // top_k)

    def mlp(self, h: Tensor) -> Tensor:
        return self.moe(h)


class NanoGPT(nn.Module):
    """nanoGPT's GPT (Karpathy): token and learned position embeddings, ``depth`` pre-LayerNorm blocks,
    a final LayerNorm and a head tied to the token embedding; no bias, no dropout. Initialisation
    as nanoGPT's: normal(0, 0.02), the residual projections normal(0, 0.02/√(2·depth))."""

    def __init__(self, vocab: int, context: int = 64, width: int = 128, depth: int = 4, heads: int = 4,
                 experts: int = 0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.context = context
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList((NanoBlockMoE(width, heads, experts) if experts else NanoBlock(width, heads))
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith(("_proj.weight", "experts.mlp_proj")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def aux_loss(self) -> Tensor:
        """The mixture-of-experts blocks' load-balancing losses of the last forward, summed (0 without)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, NanoMoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        h = self.wte(x) + self.wpe(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def cnn_norm() -> nn.Sequential:
    """MNIST CNN with normalisation and a depthwise-separable block:
    conv(1→16, 3)-BN-ReLU-depthwise conv(16, 3, groups 16)-pointwise conv(16→32, 1)-GroupNorm(4)-
    ReLU-maxpool-conv(32→32, 3)-BN-ReLU-maxpool-linear(32·7·7→10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
          "autoencoder": autoencoder,
          "autoencoder-tanh": lambda: autoencoder("tanh", "glorot"),
          "autoencoder-sparse": lambda: autoencoder("sigmoid", "sparse"), "mlp": mlp, "cnn": cnn, "digits": digits_mlp,
          "transformer": transformer_lm, "cnn-norm": cnn_norm,
          "autoencoder-wide": lambda width_mult=4: autoencoder("tanh", "glorot", wide_widths(width_mult)),
          "mlp-wide": lambda width=2048: mlp_wide(width)}
INPUT_SHAPES = {"autoencoder": (784,), "autoencoder-tanh": (784,), "autoencoder-sparse": (784,),  # one sample
                "mlp": (1, 28, 28), "cnn": (1, 28, 28), "digits": (64,),
                "transformer": (128,), "cnn-norm": (1, 28, 28), "autoencoder-wide": (784,), "mlp-wide": (1, 28, 28)}
MODEL_OPTIONS = {"autoencoder-wide": ("width_mult",), "mlp-wide": ("width",)}  # build_model's keywords


VOCAB = {"transformer": 256}  # token models: int64 inputs in 0..vocab-1


def example_input(task: str, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """A random input batch of the task's model: int64 tokens in ``0..VOCAB[task]-1`` for token
    models, else ``torch.rand`` floats of :data:`INPUT_SHAPES` (the same draw as before)."""
    shape = (batch, *INPUT_SHAPES[task])
    if task in VOCAB:
        return torch.randint(VOCAB[task], shape, generator=generator)
    return torch.rand(shape, generator=generator)


def build_model(task: str, **options: Any) -> nn.Module:
    """A fresh model for a task name in :data:`MODELS` (seed torch first for reproducibility);
    ``options``: the wide models' ``width_mult`` / ``width`` (:data:`MODEL_OPTIONS`; None: default)."""
    if task not in MODELS:
        raise ValueError(f"task must be one of {tuple(MODELS)}, got {task!r}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - set(MODEL_OPTIONS.get(task, ()))
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to task {task!r} "
                         f"(it takes {list(MODEL_OPTIONS.get(task, ())) or 'none'})")
    return MODELS[task](**options)


# The Hugging Face GPT-2 task (cgfac_bench.hf; transformers is imported when it is built).
from cgfac_bench.hf import gpt2_lm  # noqa: E402

MODELS["gpt2"] = gpt2_lm
INPUT_SHAPES["gpt2"] = (128,)
VOCAB["gpt2"] = 256
