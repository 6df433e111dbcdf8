"""Each task's tuned settings (``cgfac-bench train --tuned``), each with where it came from.

:data:`TUNED_SETTINGS` is the table: per task and optimizer a :class:`Tuned` learning rate, damping
(the initial λ for ``*-adaptive``) and :class:`cgfac_bench.hyper.SecondOrder` settings ("hyper"),
chosen by short runs of one seed (the commands in ``benchmarks/run_all.sh``), with their
:class:`Provenance`: the directories under ``benchmarks/`` that hold those runs, what they measured
(final training losses unless said otherwise) and, where no directory holds them, why.
:data:`TUNED` is the same table as plain dictionaries (``{"lr", "damping", "hyper"}``, the last two
only where set), the form the command line, ``cgfac-bench profile`` and the tests read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Provenance:
    """Where a tuned setting came from."""

    runs: tuple[str, ...]  # directories under benchmarks/ holding the runs (their commands: benchmarks/run_all.sh)
    evidence: str = ""  # what those runs (or the unrecorded ones) measured
    unrecorded: str = ""  # why no directory holds (some of) the runs; required where `runs` is empty


@dataclass(frozen=True)
class Tuned:
    """One optimizer's tuned settings on one task."""

    lr: float
    provenance: Provenance
    damping: float | None = None  # λ of the second-order methods (the initial λ for *-adaptive)
    hyper: Mapping[str, Any] = field(default_factory=dict)  # fields of cgfac_bench.hyper.SecondOrder

    def as_dict(self) -> dict[str, Any]:
        """``{"lr": ..., "damping": ..., "hyper": {...}}``, damping and hyper only where set."""
        out: dict[str, Any] = {"lr": self.lr}
        if self.damping is not None:
            out["damping"] = self.damping
        if self.hyper:
            out["hyper"] = dict(self.hyper)
        return out


# Settings shared between tasks.
_GRAFTED_TRANSFORMER = {"kl_clip": None, "graft": "rmsprop", "damping_form": "factored", "kfac_samples": 8,
                        "inv_update_steps": 20, "factor_update_steps": 5}
_GRAFTED_CNN = {"kl_clip": None, "graft": "rmsprop", "damping_form": "factored", "kfac_samples": 32,
                "inv_update_steps": 25, "factor_update_steps": 5}
_WIDE_CGFAC = {"curvature_window": 1, "curvature_samples": 128, "quad_samples": 128, "min_damping": 1e-3,
               "damping_form": "factored", "fisher": "true"}
_WIDE_KFAC = {"min_damping": 1e-3, "damping_form": "factored", "kfac_samples": 250, "quad_samples": 250,
              "inv_update_steps": 50, "fisher": "true"}
_NOT_TUNED_MLP_WIDE = "not tuned on mlp-wide itself"
_CNN_PEER = "one learning rate run at 60 s, not a grid"

_AUTOENCODER_TANH = {
    "kfac-adaptive": Tuned(1.0, damping=0.1, hyper={"min_damping": 1e-3, "damping_form": "factored",
                                                    "kfac_samples": 250, "quad_samples": 250, "inv_update_steps": 25},
                           provenance=Provenance(
                               ("tuning-autoencoder-tanh", "tuning-autoencoder-tanh-3"),
                               "λ0 ∈ {1e-3, 1e-2, 0.1}: 75.4, 69.5, 67.4 at 40 s (tuning-autoencoder-tanh); "
                               "min_damping ∈ {1e-6, 1e-4, 1e-3, 1e-2}: 63.0, 58.8, 58.5, 58.9 after 300 steps, "
                               "250 samples for factors and model, the factored form and eigh every 25 steps as "
                               "good per step as all samples, exact form, every 10; 57.7 at 100 s against SOAP "
                               "65.5, Adam 65.0 (tuning-autoencoder-tanh-3)",
                               "the per-step studies (min_damping, samples, damping form, eigh interval) ran from a "
                               'short script over cgfac.optim.KFAC: benchmarks/README.md, "Cheaper steps"')),
    "cgfac-kron-adaptive": Tuned(1.0, damping=0.1,
                                 hyper={"curvature_window": 8, "curvature_samples": 125, "min_damping": 1e-3,
                                        "damping_form": "factored", "quad_samples": 250},
                                 provenance=Provenance(("tuning-autoencoder-tanh-2",),
                                                       "79.6 at 30 s (exact curvature: 86.0)")),
    "adam": Tuned(1e-3, Provenance(("tuning-autoencoder-tanh",), "{1e-3, 3e-3}: 72.9, 79.7 at 40 s")),
    "soap": Tuned(3e-3, Provenance(("tuning-autoencoder-tanh",), "{1e-3, 3e-3}: 211.5, 97.8 at 40 s")),
    "sgd": Tuned(3e-3, Provenance(("tuning-autoencoder-tanh-2", "tuning-autoencoder-tanh"),
                                  "{3e-3, 1e-2, 0.03, 0.1}: 104.7, 209.8 (30 s), 1834, 8841 (40 s)")),
    "shampoo": Tuned(3e-3, Provenance(("tuning-autoencoder-tanh-2", "tuning-autoencoder-tanh"),
                                      "{3e-3, 1e-2, 0.03, 0.1}: 191.8, 354.4 (30 s), 2021, 7322 (40 s)")),
}

_TRANSFORMER = {
    "kfac": Tuned(5e-4, damping=1e-3, hyper=_GRAFTED_TRANSFORMER, provenance=Provenance(
        (), "45 s, one seed: KL-clipped K-FAC λ {1e-3, 1e-2, 3e-2, 0.1} × κ {1e-3, 3e-3, 1e-2}: best 1.59; "
            "grafted lr {2.5e-4, 5e-4, 1e-3, 2e-3} × λ {1e-4, 3e-4, 1e-3, 1e-2, 0.1}: best 1.358 (lr 5e-4, "
            "λ 1e-3); AdamW 3e-3 1.424, SOAP 3e-3 1.295",
        'the 45 s tuning runs kept no directory: benchmarks/README.md, "Grafting"; the 90 s runs at these '
        "settings: train-transformer-90s-graft")),
    "adamw": Tuned(3e-3, Provenance(("train-transformer-90s",), "{1e-3, 3e-3}: 1.459, 1.162 at 90 s")),
    "soap": Tuned(3e-3, Provenance(("train-transformer-90s",), "one learning rate run at 90 s, not a grid: 1.06")),
    "shampoo": Tuned(1e-3, Provenance(("train-transformer-90s",),
                                      "one learning rate run at 90 s, not a grid: 3.194")),
}

_CNN = {
    "kfac": Tuned(5e-4, damping=1e-3, hyper=_GRAFTED_CNN, provenance=Provenance(
        (), "30 s, one seed: grafted K-FAC lr {5e-4, 1e-3}: 0.0176, 0.0310; SOAP 0.0211, Adam 0.0417",
        'the 30 s tuning runs kept no directory: benchmarks/README.md, "Grafting"; the 60 s runs at these '
        "settings: train-cnn-60s-graft")),
    "soap": Tuned(3e-3, Provenance(("train-cnn-60s",), f"{_CNN_PEER}: 0.003891")),
    "adam": Tuned(1e-3, Provenance(("train-cnn-60s",), f"{_CNN_PEER}: 0.03026")),
    "sgd": Tuned(0.1, Provenance(("train-cnn-60s",), f"{_CNN_PEER}: 0.03075")),
}

# The wide autoencoder (issue 16): 60 s runs at ×4, one seed, 2,000 evaluation samples.
_WIDE = "tuning-autoencoder-wide/"
_AUTOENCODER_WIDE = {
    "cgfac-kron-adaptive": Tuned(1.0, damping=0.1, hyper=_WIDE_CGFAC, provenance=Provenance(
        tuple(_WIDE + d for d in ("cgfac-base", "cgfac-factored", "cgfac-empirical", "cgfac-factored-rank",
                                  "cgfac-factored-damping", "r2-cgfac-factored", "r2-cgfac-factored-quad128",
                                  "r2-cgfac-factored-quad64", "r2-cgfac-factored-64",
                                  "r2-cgfac-factored-64-quad128")),
        "cgfac.optim.CGFAC, 128 curvature rows per step (the true Fisher sampled on those samples only), "
        "factored damping: 81.2 (exact damping 114.1, empirical Fisher 504.4, damping_scale=\"rank\" 89.7; "
        "initial λ 0.01 / 0.1 / 1: 82.3 / 81.2 / 82.4, the LM rule adapts it). Round 2, after the quadratic "
        "model's samples were made disjoint from the curvature rows (r2-*, one quiet machine): 128 rows with "
        "the model on 250 / 128 / 64 samples: 72.9 / 71.9 / 72.0 (1315 / 1150 / 1099 ms/step); 64 rows with "
        "250 / 128: 76.4 / 75.5. Chosen: 128 rows, the model on 128 samples.")),
    "adam": Tuned(3e-4, Provenance((_WIDE + "peers",), "{3e-4, 1e-3, 3e-3, 1e-2}: 123.4, 168.5, 209, 682")),
    "muon-original": Tuned(0.05, Provenance(
        (_WIDE + "peers", _WIDE + "r2-muon"),
        "original scaling {5e-3, 0.01, 0.02, 0.05}: 186, 184, 175, 151 and (match_rms_adamw) {3e-4 .. 1e-2}: "
        "best 173 (3e-3); r2-muon (a later round, on another host): {0.02, 0.05, 0.1, 0.2}: 79.4, 78.6, 84.2, "
        "96.6")),
    "soap": Tuned(1e-3, Provenance((_WIDE + "peers",), "{3e-4 .. 1e-2}: best 583 (1e-3): 4–20 steps in 60 s")),
    "kfac-adaptive": Tuned(1.0, damping=0.1, hyper=_WIDE_KFAC, provenance=Provenance(
        (), "K-FAC for width: 250 samples for factors, eigh every 50 steps (one eigendecomposition of the "
            "4000² factors takes ≈ 10 s)",
        "not tuned further at this width: benchmarks/README.md, autoencoder-wide \"Tuning\"")),
    "shampoo": Tuned(1e-3, Provenance((_WIDE + "peers",), "{1e-3 .. 3e-2}: best 214 (1e-3): 4–20 steps in 60 s")),
}

# The wide MLP classifier (issue 26): CG-FAC and Adam tuned at width 4096, 30 s (the sweep's budget), seed 0.
_MLP = "tuning-mlp-wide-4096/"
_MLP_WIDE = {
    "cgfac-kron-adaptive": Tuned(1.0, damping=0.01, hyper=_WIDE_CGFAC, provenance=Provenance(
        tuple(_MLP + d for d in ("cgfac-damping", "cgfac-damping-low", "cgfac-64", "cgfac-exact-damping",
                                 "cgfac-empirical", "cgfac-quad-every-5", "cgfac-cheap")),
        "final training loss at 30 s: initial λ {0.001, 0.003, 0.01, 0.1, 1}: diverged, 0.179, 0.173, 0.257, 0.474 "
        "(the LM rule lowers λ by 0.77 every 5 steps, and 30 s hold 13-20 steps); at λ0 0.1: 64 rows 0.277, exact "
        "damping 0.328, empirical Fisher 0.263, quad_every=5 0.248, 32 rows with quad_every=5 0.340")),
    "adam": Tuned(1e-3, Provenance((_MLP + "peers",), "lr {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}: 0.321, 0.242, 0.197, "
                                                      "0.278, 0.616 at 30 s")),
    "muon-original": Tuned(0.02, Provenance((), unrecorded=f"{_NOT_TUNED_MLP_WIDE}: the original scaling's "
                                                           "default; at width 4096 torch.optim.Muon's bfloat16 "
                                                           "Newton-Schulz, emulated on this CPU, did not finish one "
                                                           "30 s tuning run in 8 minutes")),
    "soap": Tuned(3e-3, Provenance((), unrecorded=_NOT_TUNED_MLP_WIDE)),
    "kfac-adaptive": Tuned(1.0, damping=0.1, hyper=_WIDE_KFAC, provenance=Provenance(
        (), unrecorded=f"{_NOT_TUNED_MLP_WIDE}: autoencoder-wide's setting")),
}

_CNN_NORM = {  # the cnn task's settings; only K-FAC's lr compared again
    "kfac": Tuned(5e-4, damping=1e-3, hyper=_GRAFTED_CNN, provenance=Provenance(
        ("train-cnn-norm-60s-graft",), "lr {5e-4, 1e-3}: 0.0191, 0.0277 at 60 s (the rest: the cnn task's)")),
    **{name: Tuned(t.lr, Provenance(t.provenance.runs, f"on cnn: {t.provenance.evidence}",
                                    "not tuned on cnn-norm itself: the cnn task's setting"))
       for name, t in _CNN.items() if name != "kfac"},
}

# The Hugging Face GPT-2 task (cgfac_bench.hf), tuned at 75 s, one seed (about 40-55 steps; training
# loss), the best at a grid's edge extended in the next round.
_GPT2_RUNS = ("tuning-gpt2", "tuning-gpt2-2", "tuning-gpt2-3", "tuning-gpt2-4")
_GPT2 = {
    "kfac": Tuned(1.25e-4, damping=0.1, hyper=_GRAFTED_TRANSFORMER, provenance=Provenance(
        _GPT2_RUNS, "grafted K-FAC (the transformer task's settings) lr × λ: {2.5e-4 .. 2e-3} × {1e-3, 1e-2}: "
                    "best 2.82 (2.5e-4, 1e-2), λ 0.1: {6.25e-5, 1.25e-4, 2.5e-4, 1e-3}: 2.51, 2.52, 2.83, 3.15, "
                    "λ 1 at 1.25e-4: 2.80. K-FAC's two best lrs tie within 0.01: the larger is kept for the "
                    "longer runs.")),
    "adamw": Tuned(2.5e-4, Provenance(_GPT2_RUNS, "{1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 6e-3}: 2.71, 2.59, "
                                                  "2.95, 3.08, 3.15, 3.12, 3.28")),
    "muon-original": Tuned(0.02, Provenance(_GPT2_RUNS, "{0.01, 0.02, 0.04, 0.08}: 2.22, 2.18, 2.20, 2.19")),
    "soap": Tuned(5e-4, Provenance(_GPT2_RUNS, "{2.5e-4, 5e-4, 1e-3, 3e-3, 6e-3, 1e-2}: 3.20, 3.04, 3.06, 3.45, "
                                               "3.41, 3.58")),
}

TUNED_SETTINGS: dict[str, dict[str, Tuned]] = {
    "autoencoder-tanh": _AUTOENCODER_TANH,
    "transformer": _TRANSFORMER,
    "cnn": _CNN,
    "autoencoder-wide": _AUTOENCODER_WIDE,
    "mlp-wide": _MLP_WIDE,
    "cnn-norm": _CNN_NORM,
    "gpt2": _GPT2,
}

TUNED: dict[str, dict[str, dict[str, Any]]] = {
    task: {name: t.as_dict() for name, t in table.items()} for task, table in TUNED_SETTINGS.items()}
WIDE_CGFAC = TUNED["autoencoder-wide"]["cgfac-kron-adaptive"]  # CG-FAC's tuned wide settings
