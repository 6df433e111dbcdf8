"""Coverage of Hugging Face families: the share of parameters a preconditioner covers, with every
exception and its reason, on tiny random models (nothing downloaded). The README's coverage table is
this test's output: it fails when they differ (``CGFAC_WRITE_COVERAGE=1`` rewrites the README's table)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_models import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

import cgfac

transformers = pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- coverage-table: begin -->", "<!-- coverage-table: end -->"
T = transformers
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 64}
MOE = {"num_experts": 4, "num_experts_per_tok": 2}

# family -> (kind, builder); each a tiny random model of the family's own classes
FAMILIES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "GPT-2": ("dense decoder", lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                    n_positions=16))),
    "Llama": ("dense decoder", lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1))),
    "Gemma": ("dense decoder", lambda: T.GemmaForCausalLM(T.GemmaConfig(**SMALL, num_key_value_heads=1,
                                                                       head_dim=16))),
    "BERT": ("encoder", lambda: T.BertForMaskedLM(T.BertConfig(**SMALL))),
    "T5": ("encoder-decoder", lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=1,
                                                                             num_heads=2, d_kv=16, vocab_size=64))),
    "ViT": ("vision", lambda: T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1,
                                                                     num_attention_heads=2, intermediate_size=64,
                                                                     image_size=16, patch_size=8, num_labels=3))),
    "Mamba": ("state-space", lambda: T.MambaForCausalLM(T.MambaConfig(hidden_size=32, num_hidden_layers=1,
                                                                      vocab_size=64, state_size=4))),
    "Mixtral": ("mixture of experts", lambda: T.MixtralForCausalLM(T.MixtralConfig(
        **SMALL, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))),
    "Qwen3-MoE": ("mixture of experts", lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        **SMALL, **MOE, num_key_value_heads=1, moe_intermediate_size=32, head_dim=16))),
    "OLMoE": ("mixture of experts", lambda: T.OlmoeForCausalLM(T.OlmoeConfig(**SMALL, **MOE, num_key_value_heads=1))),
}
# The exceptions, each with the reason the registration report gives (a free parameter is not a layer
# matrix): anything else uncovered fails the test.
EXPECTED_EXCEPTIONS = {
    "ViT": {"vit.embeddings": "cls_token (1x1x32), position_embeddings (1x5x32)"},
    "Mamba": {"backbone.layers.0.mixer": "A_log (64x4), D (64)"},
}


def coverage(model: nn.Module) -> tuple[int, int, dict[str, str]]:
    """``(preconditioned parameters, trainable parameters, {uncovered module: reason})`` of a CG-FAC
    registration (K-FAC's is the same: one registration)."""
    pre = cgfac.CGFAC(model)
    covered = {id(p) for h in pre.layers.values() for p in h.params()}
    params = [p for p in model.parameters() if p.requires_grad]
    done = sum(p.numel() for p in params if id(p) in covered)
    uncovered = {e.name: e.reason for e in pre.registration_report() if not e.covered}
    return done, sum(p.numel() for p in params), uncovered


def table() -> str:
    rows = ["| family | kind | parameters | preconditioned | exceptions (reason in the registration report) |",
            "|---|---|---:|---:|---|"]
    for family, (kind, build) in FAMILIES.items():
        torch.manual_seed(0)
        model = build()
        done, total, uncovered = coverage(model)
        notes = "; ".join(f"`{name}`: {EXPECTED_EXCEPTIONS.get(family, {}).get(name, reason)} (free parameters, "
                          "plain gradient)" for name, reason in uncovered.items()) or "none"
        rows.append(f"| {family} (`{type(model).__name__}`) | {kind} | {total:,} | {100 * done / total:.1f}% | "
                    f"{notes} |")
    return "\n".join(rows)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_covered_or_each_exception_explained(family: str) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family][1]()
    done, total, uncovered = coverage(model)
    expected = EXPECTED_EXCEPTIONS.get(family, {})
    assert set(uncovered) == set(expected), uncovered
    for name, params in expected.items():
        assert f"its own parameters {params} are not a layer's weight and bias" in uncovered[name]
    if not expected:
        assert done == total
    if family == "BERT":  # the MLM head holds the bias its decoder uses: covered there, and said so
        entry = {e.name: e for e in cgfac.KFAC(model).registration_report()}["cls.predictions"]
        assert entry.covered and "cls.predictions.decoder'" in entry.reason  # the tied block's name
    if FAMILIES[family][0] == "mixture of experts":  # every expert of every layer is a block
        pre = cgfac.KFAC(model)
        assert any(".experts." in n and n.endswith(":3") for n in pre.layers)


def test_the_readme_table_is_this_tests_output() -> None:
    text = README.read_text()
    want = table()
    if os.environ.get("CGFAC_WRITE_COVERAGE"):
        text = re.sub(f"{re.escape(BEGIN)}.*?{re.escape(END)}", f"{BEGIN}\n{want}\n{END}", text, flags=re.S)
        README.write_text(text)
    match = re.search(f"{re.escape(BEGIN)}\n(.*?)\n{re.escape(END)}", text, flags=re.S)
    assert match is not None, f"README.md lacks the {BEGIN} ... {END} block"
    assert match.group(1) == want, "README's coverage table is stale: rerun with CGFAC_WRITE_COVERAGE=1\n" + want
