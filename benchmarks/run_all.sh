#!/usr/bin/env bash
# Every committed benchmark result, in the order they were made (2-core CPU machine, nothing else
# running). Each command writes JSON + Markdown (+ PNG) into benchmarks/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/cgfac-bench
# The main job, as `bash scripts/bench.sh` runs it (defaults: MNIST autoencoder, 40 s per run).
$B train --out benchmarks/train-autoencoder
# Claim 3 (warm-started CG needs 10-20 iterations), with the task's true Fisher and the empirical one.
$B cg-iters --out benchmarks/cg-iters-autoencoder
$B cg-iters --fisher empirical --out benchmarks/cg-iters-autoencoder-empirical
# The automatic method choice against every candidate, on every layer of the benchmark models.
$B choice --out benchmarks/choice
# Claims 1 and 2: one layer's cost against width (a method's larger widths are skipped, and the
# skip recorded, once one call of it takes over 5 s: the session had no time for slower points).
$B layer --repeats 3 --warm-steps 5 --time-budget 5 --max-seconds-per-method 5 --out benchmarks/layer
# The 300 s autoencoder target: CG-FAC against Adam and SGD at their best grid learning rates.
lrs=$(.venv/bin/python - <<'PY'
import json
r = json.load(open("benchmarks/train-autoencoder/results.json"))
best = {n: r["runs"][i]["lr"] for n, i in r["best"].items()}
print(";".join(f"{n}={best[n]}" for n in ("cgfac-kron", "adam", "sgd") if n in best))
PY
)
$B train --budget 300 --optimizers cgfac-kron,adam,sgd --lr-grid "$lrs" --out benchmarks/train-autoencoder-300s

# --- Issue 8: second-order training that wins (cgfac.optim), batch 1000, subnormals flushed ---
# Tuning on short runs (one seed): K-FAC's initial damping, the peers' learning rates.
$B train --task autoencoder-tanh --budget 40 --optimizers kfac-adaptive,adam,sgd,soap,shampoo \
  --lr-grid "kfac-adaptive=1;adam=1e-3,3e-3;sgd=0.03,0.1;soap=1e-3,3e-3;shampoo=0.03,0.1" \
  --damping-grid "kfac-adaptive=1e-3,1e-2,1e-1" --out benchmarks/tuning-autoencoder-tanh
$B train --task autoencoder-tanh --budget 30 --optimizers cgfac-kron-adaptive,cgfac-exact-adaptive,sgd,shampoo \
  --lr-grid "cgfac-kron-adaptive=1;cgfac-exact-adaptive=1;sgd=0.003,0.01;shampoo=0.003,0.01" --damping-grid "0.1" \
  --curvature-window 8 --curvature-samples 125 --out benchmarks/tuning-autoencoder-tanh-2
# Per-step studies of K-FAC's damping floor, sample counts, damping form and eigh interval
# (600 steps, one seed, loss on the same fixed 10,000 training images) were run with a short
# script over cgfac.optim.KFAC; their numbers are in the README ("Why min_damping is 1e-3",
# "Cheaper steps") and in the provenance of TUNED_SETTINGS in cgfac_bench/tuned.py.
# Timed check of the chosen K-FAC settings against SOAP and Adam (100 s, one seed).
$B train --task autoencoder-tanh --optimizers kfac-adaptive,soap,adam --lr-grid "kfac-adaptive=1;soap=3e-3;adam=1e-3" \
  --damping-grid "kfac-adaptive=0.1" --budget 100 \
  --hyper "min_damping=1e-3,damping_form=factored,kfac_samples=250,quad_samples=250,inv_update_steps=25" \
  --out benchmarks/tuning-autoencoder-tanh-3
# The 300 s target: the contenders at their tuned settings (TUNED), 3 seeds, side by side.
$B train --task autoencoder-tanh --tuned --optimizers kfac-adaptive,adam,soap --seeds 0,1,2 --budget 300 \
  --out benchmarks/train-autoencoder-tanh-300s
# CG-FAC, one seed, straight after (SGD and Shampoo were not rerun this round: 63.9 and 88.3 in the
# previous one, far behind SOAP); and K-FAC with the library's defaults (λ0 = 1e-2, empirical
# Fisher, every other setting cgfac.optim.KFAC's default), only the learning rate chosen.
$B train --task autoencoder-tanh --tuned --optimizers cgfac-kron-adaptive --budget 300 \
  --out benchmarks/train-autoencoder-tanh-300s-others
$B train --task autoencoder-tanh --optimizers kfac-adaptive --lr-grid "kfac-adaptive=1" \
  --damping-grid "kfac-adaptive=0.01" --fisher empirical --budget 300 --reference-seconds 60 \
  --out benchmarks/train-autoencoder-tanh-300s-defaults
# The previous main job (sigmoid units, PyTorch's initialisation), 100 s, K-FAC at the tanh settings.
H="min_damping=1e-3,damping_form=factored,kfac_samples=250,quad_samples=250,inv_update_steps=25"
$B train --task autoencoder --optimizers kfac-adaptive,adam,soap --lr-grid "kfac-adaptive=1;adam=1e-3;soap=3e-3" \
  --damping-grid "kfac-adaptive=0.1" --hyper "$H" --budget 100 --out benchmarks/train-autoencoder-100s
# The MNIST CNN (cross-entropy, batch 256), 60 s per run, one seed, small grids.
$B train --task cnn --optimizers kfac-adaptive,adam,soap,sgd --lr-grid "kfac-adaptive=1;adam=1e-3;soap=3e-3;sgd=0.1" \
  --damping-grid "kfac-adaptive=0.01,0.1" --hyper "damping_form=factored,inv_update_steps=25" --budget 60 \
  --out benchmarks/train-cnn-60s

# --- Issue 10: the byte-level transformer on the standard library's source, and the normalised CNN ---
$B train --task transformer --optimizers kfac-adaptive,adamw,soap,shampoo \
  --lr-grid "kfac-adaptive=1;adamw=1e-3,3e-3;soap=3e-3;shampoo=1e-3" --damping-grid "kfac-adaptive=0.01" \
  --hyper "damping_form=factored,kfac_samples=8,quad_samples=8,inv_update_steps=25" --budget 90 \
  --out benchmarks/train-transformer-90s
$B train --task cnn-norm --optimizers kfac-adaptive,adam,soap --lr-grid "kfac-adaptive=1;adam=1e-3;soap=3e-3" \
  --damping-grid "kfac-adaptive=0.01" --hyper "damping_form=factored,inv_update_steps=25" --budget 60 \
  --out benchmarks/train-cnn-norm-60s

# --- Grafting (graft="rmsprop"): K-FAC under SGD with momentum, the direction at RMSProp's step
# length; rows only for the kept batch entries (curvature_samples, now counted in batch entries).
# Tuning: 45 s (transformer) and 30 s (CNN) runs of one seed; the grids are in the README.
G="damping_form=factored,graft=rmsprop,inv_update_steps=20,factor_update_steps=5"
$B train --task transformer --optimizers kfac,adamw,soap,shampoo --lr-grid "kfac=5e-4;adamw=3e-3;soap=3e-3;shampoo=1e-3" \
  --damping-grid "kfac=1e-3" --kl-clip 0 --hyper "$G,kfac_samples=8" --seeds 0,1 --budget 90 \
  --out benchmarks/train-transformer-90s-graft
G="damping_form=factored,graft=rmsprop,inv_update_steps=25,factor_update_steps=5,kfac_samples=32"
$B train --task cnn --budget 60 --seeds 0,1 --optimizers kfac,soap,adam --lr-grid "kfac=5e-4;soap=3e-3;adam=1e-3" \
  --damping-grid "kfac=1e-3" --kl-clip 0 --hyper "$G" --out benchmarks/train-cnn-60s-graft
$B train --task cnn-norm --budget 60 --optimizers kfac,soap,adam --lr-grid "kfac=5e-4,1e-3;soap=3e-3;adam=1e-3" \
  --damping-grid "kfac=1e-3" --kl-clip 0 --hyper "$G" --out benchmarks/train-cnn-norm-60s-graft

# --- Issue 11: the soak run (5,000 steps, resident memory every 100 steps; paused while timed runs ran)
$B soak --task autoencoder-tanh --optimizer cgfac --steps 5000 --every 100 --warmup 1000 \
  --out benchmarks/soak-cgfac-autoencoder-tanh

# --- Issue 16: CG-FAC in its own regime, wide layers (autoencoder-wide: hidden widths × --width-mult) ---
# Tuning at ×4, 60 s, one seed, 2,000 evaluation samples (benchmarks/tuning-autoencoder-wide/<name>):
T="--task autoencoder-wide --width-mult 4 --budget 60 --eval-every 10 --eval-samples 2000"
O=benchmarks/tuning-autoencoder-wide
$B train $T --optimizers adam,muon,muon-original,soap,shampoo --out $O/peers \
  --lr-grid "adam=3e-4,1e-3,3e-3,1e-2;muon=3e-4,1e-3,3e-3,1e-2;muon-original=5e-3,0.01,0.02,0.05;soap=3e-4,1e-3,3e-3,1e-2;shampoo=1e-3,3e-3,1e-2,3e-2"
C="--optimizers cgfac-kron-adaptive --lr-grid 1.0 --damping-grid 0.1"
$B train $T $C --hyper "curvature_samples=128,quad_samples=250,min_damping=1e-3" --out $O/cgfac-base
$B train $T $C --hyper "curvature_samples=128,quad_samples=250,min_damping=1e-3,damping_form=factored" --out $O/cgfac-factored
$B train $T $C --hyper "curvature_samples=128,quad_samples=250,min_damping=1e-3,fisher=empirical" --out $O/cgfac-empirical
$B train $T $C --damping-grid 0.01,0.1 --hyper "curvature_samples=128,quad_samples=250,min_damping=1e-3,damping_scale=rank" \
  --out $O/cgfac-rank
F="damping_form=factored,min_damping=1e-3"
$B train $T $C --hyper "$F,curvature_samples=128,quad_samples=250,damping_scale=rank" --out $O/cgfac-factored-rank
$B train $T $C --damping-grid 0.01,1.0 --hyper "$F,curvature_samples=128,quad_samples=250" --out $O/cgfac-factored-damping
$B train $T $C --hyper "$F,curvature_samples=64,quad_samples=250" --out $O/cgfac-factored-64
$B train $T $C --hyper "$F,curvature_samples=256,quad_samples=250" --out $O/cgfac-factored-256
$B train $T $C --hyper "$F,curvature_samples=128,quad_samples=128" --out $O/cgfac-factored-quad128
$B train $T --optimizers cgfac-kron --lr-grid 1e-4,3e-4 --damping-grid 1e-3 --out $O/cgfac-graft \
  --hyper "curvature_samples=128,graft=rmsprop,kl_clip=none,damping_form=factored"
# Round 2 (after the quadratic model's samples were made disjoint from the curvature rows):
for spec in "128 250 r2-cgfac-factored" "128 128 r2-cgfac-factored-quad128" "128 64 r2-cgfac-factored-quad64" \
            "64 128 r2-cgfac-factored-64-quad128" "64 250 r2-cgfac-factored-64"; do
  set -- $spec
  $B train $T $C --hyper "$F,curvature_samples=$1,quad_samples=$2" --out $O/$3
done
$B train $T --optimizers muon,muon-original --out $O/r2-muon \
  --lr-grid "muon=1e-3,3e-3,1e-2,3e-2;muon-original=0.02,0.05,0.1,0.2"
# One step at ×4 itemised (the tuned CG-FAC against Adam):
$B profile --task autoencoder-wide --width-mult 4 --optimizer cgfac-kron-adaptive --out benchmarks/profile-autoencoder-wide-x4
# The target run: ×4, 300 s, the tuned settings; CG-FAC and Adam (the best peer at 60 s) on 3 seeds, the others on one.
W="--task autoencoder-wide --width-mult 4 --tuned --budget 300 --eval-every 25 --eval-samples 5000"
$B train $W --optimizers cgfac-kron-adaptive,adam --seeds 0,1,2 --out benchmarks/train-autoencoder-wide-x4-300s
$B train $W --optimizers cgfac-kron-adaptive,muon-original --lr-grid "muon-original=0.05" --seeds 0,1,2 \
  --out benchmarks/train-autoencoder-wide-x4-300s-muon
# (earlier code and host, kept for the record: muon-original, soap, kfac-adaptive, one seed each)
# $B train $W --optimizers muon-original,soap,kfac-adaptive --out benchmarks/train-autoencoder-wide-x4-300s-others
# The width sweep: ×1, ×2, ×4, 40 s per run, time to training loss 130, one seed.
$B sweep --task autoencoder-wide --widths 1,2,4 --target 130 --out benchmarks/sweep-autoencoder-wide -- \
  --tuned --budget 40 --eval-every 4 --eval-samples 2000 --optimizers cgfac-kron-adaptive,adam,muon-original,soap,kfac-adaptive
$B sweep --task mlp-wide --widths 1024,2048,4096 --target 0.2 --out benchmarks/sweep-mlp-wide -- \
  --tuned --budget 30 --eval-every 3 --eval-samples 2000 --optimizers cgfac-kron-adaptive,adam,muon-original
# The sweeps' summaries (the width from which CG-FAC stays ahead) rebuilt from their saved runs:
# $B sweep --task autoencoder-wide --widths 1,2,4 --target 130 --out benchmarks/sweep-autoencoder-wide --from-results
# Preliminary GPT-2 run (issue 17; one seed, 300 s, the transformer task's lrs, before the gpt2 grids; another host):
$B train --task gpt2 --tuned --optimizers kfac,adamw,muon-original,soap --budget 300 --out benchmarks/train-gpt2-300s-prelim \
  --lr-grid "kfac=5e-4;adamw=3e-3;muon-original=0.02;soap=3e-3" --damping-grid "kfac=1e-3"  # TUNED["gpt2"] then
# GPT-2 (issue 17), tuning: 75 s per run, one seed, this host (2-core AMD EPYC), the best at a grid's
# edge extended in the next round.
G="--task gpt2 --tuned --budget 75 --eval-every 25"
$B train $G --optimizers adamw,muon-original,soap,kfac --damping-grid "kfac=1e-3,1e-2" --out benchmarks/tuning-gpt2 \
  --lr-grid "adamw=5e-4,1e-3,2e-3,3e-3,6e-3;muon-original=0.01,0.02,0.04,0.08;soap=1e-3,3e-3,6e-3,1e-2;kfac=2.5e-4,5e-4,1e-3,2e-3"
$B train $G --optimizers adamw,soap,kfac --lr-grid "adamw=2.5e-4;soap=5e-4;kfac=1.25e-4,2.5e-4,1e-3" \
  --damping-grid "kfac=0.1" --out benchmarks/tuning-gpt2-2
$B train $G --optimizers adamw,soap,kfac --lr-grid "adamw=1.25e-4;soap=2.5e-4;kfac=6.25e-5" --damping-grid "kfac=0.1" \
  --out benchmarks/tuning-gpt2-3
$B train $G --optimizers kfac --lr-grid "kfac=1.25e-4" --damping-grid "kfac=1" --out benchmarks/tuning-gpt2-4
# GPT-2 (issue 17), the side-by-side run at the tuned settings: 240 s per run, 3 seeds, held-out curve
# on 256 fixed held-out sequences every 30 s (the race to AdamW's and the best peer's final held-out loss).
$B train --task gpt2 --tuned --optimizers kfac,adamw,muon-original,soap --budget 240 --eval-every 30 --seeds 0,1,2 \
  --out benchmarks/train-gpt2-240s
# nanoGPT-style LM benchmark (issue 23): nanoGPT's char-level GPT (size S: 4 layers, 4 heads, width 128,
# context 64, batch 12, 2000 iterations; warm-up 100, cosine to lr/10, clip 1.0) on the stdlib's prose.
# Tuning at the full horizon, one seed, two runs at a time on one thread each (losses only: --jobs 2).
$B train --task nanogpt-s --jobs 2 --optimizers adamw,muon-f32,tkfac-ortho-input,tkfac-ekfac,soap \
  --out benchmarks/tuning-nanogpt-s
# Round 2 (SOAP, EKFAC orthogonalised, plain EKFAC; stopped after SOAP 8e-3 for time) and the
# ortho-input variants at its best lr (power -1, damping 0.1, 128 rows per layer):
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ekfac-ortho,soap,tkfac-ekfac \
  --lr-grid "soap=1e-3,2e-3,4e-3,8e-3,1.6e-2;tkfac-ekfac=4e-3,8e-3;tkfac-ekfac-ortho=2e-3,4e-3,8e-3" \
  --out benchmarks/tuning-nanogpt-s-2
$B train --task nanogpt-s --jobs 1 --threads 1 --optimizers tkfac-ortho-input --lr-grid 4e-3 \
  --hyper "power=-1|damping=0.1" --out benchmarks/tuning-nanogpt-s-variants
$B train --task nanogpt-s --jobs 1 --threads 1 --optimizers tkfac-ortho-input --lr-grid 4e-3 \
  --hyper "rows=128|rows=128,eig_every=25" --out benchmarks/tuning-nanogpt-s-rows  # the second stopped for time
# Side by side at the tuned settings (TUNED_LM), 3 seeds; the 0.8x-steps run; step times one at a time.
$B train --task nanogpt-s --tuned --jobs 2 --seeds 0,1,2 --optimizers adamw-published,adamw,muon-f32,tkfac-ortho-input \
  --out benchmarks/train-nanogpt-s
$B train --task nanogpt-s --tuned --jobs 2 --seeds 0,1,2 --iters 1600 --optimizers tkfac-ortho-input \
  --out benchmarks/train-nanogpt-s-1600
$B train --task nanogpt-s --tuned --jobs 1 --threads 1 --iters 100 \
  --optimizers adamw,muon-f32,tkfac-ortho-input,tkfac-ekfac-ortho,soap --lr-grid "soap=2e-3" --out benchmarks/speed-nanogpt-s
# Round 3 (issue 23, cheaper steps): factor refresh and eigendecomposition periods at lr 4e-3, one seed,
# two runs at a time (losses only); their runs.jsonl joined into one report.
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=5,eig_every=20|factors=rows,rows=128" --out /tmp/s-cheap
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10|rows=128,factor_every=5,eig_every=5" --out /tmp/s-compact
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "factor_every=32,eig_every=32|rows=128,factor_every=32,eig_every=32" --out /tmp/s-32
cat /tmp/s-cheap/runs.jsonl /tmp/s-compact/runs.jsonl /tmp/s-32/runs.jsonl > /tmp/s-steps.jsonl
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs /tmp/s-steps.jsonl --out benchmarks/tuning-nanogpt-s-steps
# Size M (width 256), 2000 iterations, one seed, grids centred on S's best; two invocations joined.
$B train --task nanogpt-m --iters 2000 --optimizers adamw-published,adamw --lr-grid "adamw=2e-3" --jobs 2 \
  --out /tmp/m-grid  # started with more rates; stopped after these two, the grid re-planned (benchmarks/README.md)
$B train --task nanogpt-m --iters 2000 --optimizers muon-f32,tkfac-ortho-input,adamw \
  --lr-grid "muon-f32=2e-3,4e-3,8e-3;tkfac-ortho-input=1e-3,2e-3,4e-3;adamw=5e-4" \
  --hyper "rows=128,factor_every=10,eig_every=10" --jobs 2 --out /tmp/m-grid2
# recorded-runs.jsonl: the runs of both, and the adamw-published run again as adamw lr=1e-3 (the same computation)
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-m/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-m
# Step times, one run at a time on one thread, 100 iterations (the machine otherwise idle).
for T in s m moe; do
  TASK=nanogpt-$T; [ $T = moe ] && TASK=nanogpt-moe-s
  LR="adamw=4e-3;muon-f32=8e-3;tkfac-ortho-input=4e-3"; [ $T = m ] && LR="adamw=1e-3;muon-f32=4e-3;tkfac-ortho-input=2e-3"
  $B train --task $TASK --jobs 1 --threads 1 --iters 100 --optimizers adamw,muon-f32,tkfac-ortho-input \
    --lr-grid "$LR" --hyper "rows=128,factor_every=10,eig_every=10" --out benchmarks/speed-nanogpt-round3/$T
done
# The small MoE variant (issue 24): nanoGPT-S with every MLP 4 experts (top 2), at size S's tuned rates, one seed,
# one run at a time on one thread (two nanogpt-m tuning runs shared the cores).
$B train --task nanogpt-moe-s --optimizers tkfac-ortho-input,muon-f32,adamw \
  --lr-grid "adamw=4e-3;muon-f32=8e-3;tkfac-ortho-input=4e-3" --hyper "rows=128,factor_every=10,eig_every=10" \
  --jobs 1 --threads 1 --out benchmarks/train-nanogpt-moe-s
# Real sizes (issue 24): GPT-2 small and a 112 M-parameter Mixtral, two steps per optimizer, peak memory.
$B memory --optimizers adamw muon-f32 tkfac cgfac kfac --steps 2 --batch 2 --seq 64 --threads 1 --timeout 1500 \
  --out benchmarks/gpt2-small-memory/round2
$B memory --optimizers kfac --memory-budget 3e9 --steps 2 --batch 2 --seq 64 --threads 1 --timeout 1500 \
  --out benchmarks/gpt2-small-memory/round2-budget-3e9
$B memory --model moe --optimizers adamw muon-f32 tkfac cgfac kfac --steps 2 --batch 2 --seq 64 --threads 1 \
  --timeout 1500 --out benchmarks/moe-100m-memory
# Round 3 of the real sizes (issue 24): K-FAC at the default budget now held to 6x the parameters' bytes.
$B memory --optimizers kfac --steps 2 --batch 2 --seq 64 --threads 1 --timeout 1500 \
  --out benchmarks/gpt2-small-memory/round3-kfac-default
$B memory --model moe --optimizers kfac --steps 2 --batch 2 --seq 64 --threads 1 --timeout 1500 \
  --out benchmarks/moe-100m-memory/round3-kfac-default
# Round 4 (issue 23): step times one run at a time on one thread, 100 iterations, every direction.
for T in s m moe; do
  TASK=nanogpt-$T; [ $T = moe ] && TASK=nanogpt-moe-s
  LR="adamw=4e-3;muon-f32=8e-3;tkfac-ortho-input=4e-3;tkfac-newton=4e-3;tkfac-spectral=8e-3"
  [ $T = m ] && LR="adamw=1e-3;muon-f32=4e-3;tkfac-ortho-input=4e-3;tkfac-newton=4e-3;tkfac-spectral=8e-3"
  $B train --task $TASK --jobs 1 --threads 1 --iters 100 --optimizers adamw,muon-f32,tkfac-ortho-input,tkfac-newton,tkfac-spectral \
    --lr-grid "$LR" --hyper "rows=128,factor_every=10,eig_every=10" --out benchmarks/speed-nanogpt-round4/$T
done
# Round 4, size S, 2000 iterations, seed 0: power -1 (Newton-Muon's, by Cholesky) and the spectral direction,
# over learning rate and damping (recorded as tkfac-newton and tkfac-spectral), joined with --from-runs.
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-s-cholesky/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-s-cholesky
# Seeds 1 and 2 at the kept settings (S: TransformerKFAC only; its Muon and AdamW seeds are train-nanogpt-s's),
# joined with seed 0 (tuning-nanogpt-m, tuning-nanogpt-s-steps) into the 3-seed reports.
$B train --task nanogpt-m --iters 2000 --optimizers tkfac-ortho-input,muon-f32,adamw \
  --lr-grid "tkfac-ortho-input=4e-3;muon-f32=4e-3;adamw=1e-3" --hyper "rows=128,factor_every=10,eig_every=10" \
  --seeds 1,2 --jobs 2 --out /tmp/seeds/m
$B train --task nanogpt-s --iters 2000 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10" --seeds 1,2 --jobs 2 --out /tmp/seeds/s
# recorded-runs.jsonl: those runs with the seed-0 runs of the same configurations
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-m-3seeds/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-m-3seeds
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-s-3seeds/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-s-3seeds
# Round 5 (issue 26): the ×4 step with its roofline, and the quadratic model on a schedule (one seed, 120 s each,
# one run at a time; the first run holds Adam).
$B profile --task autoencoder-wide --width-mult 4 --optimizer cgfac-kron-adaptive \
  --out benchmarks/profile-autoencoder-wide-x4-round5
W="--task autoencoder-wide --width-mult 4 --tuned --budget 120 --eval-every 25 --eval-samples 2000"
$B train $W --optimizers cgfac-kron-adaptive,adam --out benchmarks/train-autoencoder-wide-x4-120s-round5/base
$B train $W --optimizers cgfac-kron-adaptive --hyper quad_every=5,quad_tol=0.5 \
  --out benchmarks/train-autoencoder-wide-x4-120s-round5/quad-every-5

# The ×4 target run, 300 s, 3 seeds (per-seed ratios: python scripts/time_to_peer.py .../results.json)
W="--task autoencoder-wide --width-mult 4 --tuned --budget 300 --eval-every 25 --eval-samples 5000"
$B train $W --optimizers cgfac-kron-adaptive,adam --seeds 0,1,2 --out benchmarks/train-autoencoder-wide-x4-300s-round5
# mlp-wide at width 4096 (issue 26): Adam and CG-FAC tuned at 30 s (the sweep's budget), seed 0; then 3 seeds of each best.
# (Muon's torch.optim bfloat16 Newton-Schulz did not finish one 30 s run in 8 minutes here at this width.)
M="--task mlp-wide --width 4096 --tuned --budget 30 --eval-every 3 --eval-samples 2000"
O=benchmarks/tuning-mlp-wide-4096
$B train $M --optimizers adam --lr-grid "adam=1e-4,3e-4,1e-3,3e-3,1e-2" --out $O/peers
$B train $M --optimizers cgfac-kron-adaptive --damping-grid 0.01,0.1,1 --out $O/cgfac-damping
$B train $M --optimizers cgfac-kron-adaptive --damping-grid 0.001,0.003 --out $O/cgfac-damping-low
for spec in "curvature_samples=64,quad_samples=64 cgfac-64" "damping_form=exact cgfac-exact-damping" \
            "fisher=empirical cgfac-empirical" "quad_every=5,quad_tol=0.5 cgfac-quad-every-5" \
            "curvature_samples=32,quad_samples=64,quad_every=5,quad_tol=0.5 cgfac-cheap"; do
  set -- $spec
  $B train $M --optimizers cgfac-kron-adaptive --damping-grid 0.1 --hyper "$1" --out $O/$2
done
$B train $M --optimizers cgfac-kron-adaptive,adam --seeds 0,1,2 --out benchmarks/train-mlp-wide-4096-3seeds
# ×8 (issue 26): 300 s, seed 0, the ×4-tuned settings; the ×8 and ×16 steps itemised. Muon's run was stopped after
# 12 minutes without finishing a step (torch.optim.Muon's bfloat16 Newton-Schulz, emulated on this CPU); the
# report records it as an error.
$B profile --task autoencoder-wide --width-mult 8 --optimizer cgfac-kron-adaptive --steps 3 --warmup 2 \
  --out benchmarks/profile-autoencoder-wide-x8
$B train --task autoencoder-wide --width-mult 8 --tuned --budget 300 --eval-every 50 --eval-samples 2000 \
  --optimizers cgfac-kron-adaptive,adam,muon-original --out benchmarks/train-autoencoder-wide-x8-300s
$B profile --task autoencoder-wide --width-mult 16 --optimizer cgfac-kron-adaptive --steps 2 --warmup 1 \
  --out benchmarks/profile-autoencoder-wide-x16
# Round 6 (issue 23): low-rank running factors (TransformerKFAC rank=k) and sides="smaller", seed 0, 2000
# iterations, two runs at a time on one thread each; joined with the seed-0 runs of Muon, AdamW and the dense
# factors (train-nanogpt-s-3seeds, train-nanogpt-m-3seeds) into the reports with --from-runs.
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-smaller --lr-grid "tkfac-ortho-smaller=4e-3,8e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10" --out /tmp/runs/s-smaller
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=128|rows=128,factor_every=10,eig_every=10,rank=64" \
  --out /tmp/runs/s-rank
$B train --task nanogpt-m --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=128|rows=128,factor_every=10,eig_every=10,rank=256" \
  --out /tmp/runs/m-rank
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=64,damping=0.01|rows=128,factor_every=10,eig_every=10,rank=64,damping=0.1" \
  --out /tmp/runs/s-rank64-damping
$B train --task nanogpt-s --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=2e-3,8e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=64" --out /tmp/runs/s-rank64-lr
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-s-round6/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-s-round6
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-m-round6/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-m-round6
# Seeds 1 and 2 of the kept settings (S rank=64, M rank=256), joined with seed 0 and Muon's and AdamW's seeds.
$B train --task nanogpt-s --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=64" --seeds 1,2 --out /tmp/runs/s-rank64-seeds
$B train --task nanogpt-m --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "rows=128,factor_every=10,eig_every=10,rank=256" --seeds 1,2 --out /tmp/runs/m-rank256-seeds
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-s-rank-3seeds/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-s-rank-3seeds
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-m-rank-3seeds/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-m-rank-3seeds
# Step times, interleaved (one iteration of each optimizer in turn, one thread), the machine otherwise idle.
S="rows=128,factor_every=10,eig_every=10"
# (the dense spec says rank=none: the tuned settings it starts from now carry the kept rank)
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-s --rounds 250 \
  --json benchmarks/speed-nanogpt-round6/s.json muon-f32 adamw "tkfac-ortho-input:$S,rank=none" "tkfac-ortho-input:$S,rank=64"
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-m --rounds 80 --warmup 10 \
  --json benchmarks/speed-nanogpt-round6/m.json muon-f32 adamw "tkfac-ortho-input:$S,rank=none" "tkfac-ortho-input:$S,rank=256"

# --- Round 7 (issue 23): four Newton-Schulz iterations on the preconditioned momentum ---
# S, seed 0: 3/4 iterations for TransformerKFAC (rank=64) and Muon; then 4 iterations on seeds 1, 2.
$B train --task nanogpt-s --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "$S,rank=64,ns_steps=3|$S,rank=64,ns_steps=4" --out /tmp/runs/s-ns
$B train --task nanogpt-s --iters 2000 --jobs 2 --optimizers muon-f32 --lr-grid "muon-f32=8e-3" \
  --hyper "ns_steps=3|ns_steps=4" --out /tmp/runs/s-muon-ns
$B train --task nanogpt-s --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "$S,rank=64,ns_steps=4" --seeds 1,2 --out /tmp/runs/s-ns4-seeds
# M: 4 iterations (rank=256) on 3 seeds; Muon with 4 on seed 0.
$B train --task nanogpt-m --iters 2000 --jobs 2 --optimizers tkfac-ortho-input --lr-grid "tkfac-ortho-input=4e-3" \
  --hyper "$S,rank=256,ns_steps=4" --seeds 0,1,2 --out /tmp/runs/m-ns4
$B train --task nanogpt-m --iters 2000 --jobs 1 --threads 1 --optimizers muon-f32 --lr-grid "muon-f32=4e-3" \
  --hyper "ns_steps=4" --out /tmp/runs/m-muon-ns4
# Reports over the recorded runs (with the references' seeds of round 6), the interleaved step times
# (machine otherwise idle; the files' specs predate the tuned M setting's ns_steps=4, so their 5 is
# implicit) and the time ratios (steps ratio x interleaved step ratio).
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-s-ns/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-s-ns
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-m-ns4-3seeds/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-m-ns4-3seeds
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-s --rounds 250 \
  --json benchmarks/speed-nanogpt-round7/s.json muon-f32 adamw "tkfac-ortho-input:$S,rank=64,ns_steps=5" "tkfac-ortho-input:$S,rank=64,ns_steps=4"
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-m --rounds 80 --warmup 10 \
  --json benchmarks/speed-nanogpt-round7/m.json muon-f32 adamw "tkfac-ortho-input:$S,rank=256,ns_steps=5" "tkfac-ortho-input:$S,rank=256,ns_steps=4"
PYTHONPATH=src .venv/bin/python scripts/lm_time_to_target.py benchmarks/tuning-nanogpt-s-ns/recorded-runs.jsonl \
  benchmarks/speed-nanogpt-round7/s.json "tkfac-ortho-input:$S,rank=64,ns_steps=5" "tkfac-ortho-input:$S,rank=64,ns_steps=4"
PYTHONPATH=src .venv/bin/python scripts/lm_time_to_target.py benchmarks/train-nanogpt-m-ns4-3seeds/recorded-runs.jsonl \
  benchmarks/speed-nanogpt-round7/m.json "tkfac-ortho-input:$S,rank=256,ns_steps=5" "tkfac-ortho-input:$S,rank=256,ns_steps=4"

# --- Round 8 (issue 23): Newton-Schulz in Gram form (ns_form="auto", now the default); Polar Express ---
# Polar Express coefficients, S seed 0, 4 and 5 iterations, for TransformerKFAC and for Muon (muon-f32
# takes the same --hyper; the factor keys do nothing with power=0).
$B train --task nanogpt-s --iters 2000 --jobs 2 --optimizers tkfac-ortho-input,muon-f32 \
  --lr-grid "tkfac-ortho-input=4e-3;muon-f32=8e-3" \
  --hyper "$S,rank=64,ns_schedule=polar-express|$S,rank=64,ns_steps=4,ns_schedule=polar-express" --out /tmp/runs/s-pe
# The Gram form's runs (every matrix in Gram form): S seeds 0-2, M seed 0 (one run at a time per core).
$B train --task nanogpt-s --iters 2000 --jobs 1 --threads 1 --optimizers tkfac-ortho-input \
  --lr-grid "tkfac-ortho-input=4e-3" --hyper "$S,rank=64,ns_steps=5,ns_form=gram" --seeds 0,1,2 --out /tmp/runs/s-gram
$B train --task nanogpt-m --iters 2000 --jobs 1 --threads 1 --optimizers tkfac-ortho-input \
  --lr-grid "tkfac-ortho-input=4e-3" --hyper "$S,rank=256,ns_steps=4,ns_form=gram" --out /tmp/runs/m-gram
# Step times, interleaved, the machine otherwise idle: the plain form (torch.optim.Muon's, as before),
# the default "auto" (the Gram form on the rectangular matrices), and Muon given the Gram form too.
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-s --rounds 250 \
  --json benchmarks/speed-nanogpt-round8/s.json muon-f32 adamw "tkfac-ortho-input:$S,rank=64,ns_steps=5,ns_form=plain" \
  "tkfac-ortho-input:$S,rank=64,ns_steps=5" "tkfac-ortho-input:$S,rank=64,ns_steps=4" "muon-f32:ns_form=gram"
PYTHONPATH=src .venv/bin/python scripts/lm_step_time.py --task nanogpt-m --rounds 80 --warmup 10 \
  --json benchmarks/speed-nanogpt-round8/m.json muon-f32 adamw "tkfac-ortho-input:$S,rank=256,ns_steps=4,ns_form=plain" \
  "tkfac-ortho-input:$S,rank=256,ns_steps=4" "tkfac-ortho-input:$S,rank=256,ns_steps=5" "muon-f32:ns_form=gram"
# Reports over the recorded runs (round 7's references and plain-form runs, then this round's) and the
# time ratios: steps ratio per seed x the interleaved step ratio ("A@B": A's runs at B's step time).
$B train --task nanogpt-s --iters 2000 --jobs 2 --from-runs benchmarks/tuning-nanogpt-s-round8/recorded-runs.jsonl \
  --out benchmarks/tuning-nanogpt-s-round8
$B train --task nanogpt-m --iters 2000 --jobs 2 --from-runs benchmarks/train-nanogpt-m-round8/recorded-runs.jsonl \
  --out benchmarks/train-nanogpt-m-round8
PYTHONPATH=src .venv/bin/python scripts/lm_time_to_target.py benchmarks/tuning-nanogpt-s-round8/recorded-runs.jsonl \
  benchmarks/speed-nanogpt-round8/s.json \
  "tkfac-ortho-input:$S,rank=64,ns_steps=5,ns_form=gram@tkfac-ortho-input:$S,rank=64,ns_steps=5" \
  "tkfac-ortho-input:$S,rank=64,ns_steps=5" "tkfac-ortho-input:$S,rank=64,ns_steps=4" \
  "tkfac-ortho-input:$S,rank=64,ns_steps=5@tkfac-ortho-input:$S,rank=64,ns_steps=5,ns_form=plain"
PYTHONPATH=src .venv/bin/python scripts/lm_time_to_target.py benchmarks/train-nanogpt-m-round8/recorded-runs.jsonl \
  benchmarks/speed-nanogpt-round8/m.json \
  "tkfac-ortho-input:$S,rank=256,ns_steps=4,ns_form=gram@tkfac-ortho-input:$S,rank=256,ns_steps=4" \
  "tkfac-ortho-input:$S,rank=256,ns_steps=4" "tkfac-ortho-input:$S,rank=256,ns_steps=5" \
  "tkfac-ortho-input:$S,rank=256,ns_steps=4@tkfac-ortho-input:$S,rank=256,ns_steps=4,ns_form=plain"

# --- Round 8 (issue 26): the ×4 target run with the quadratic model on a schedule, 3 seeds ---
W="--task autoencoder-wide --width-mult 4 --tuned --budget 300 --eval-every 25 --eval-samples 5000"
$B train $W --optimizers cgfac-kron-adaptive,adam --hyper quad_every=5,quad_tol=0.5 --seeds 0,1,2 \
  --out benchmarks/train-autoencoder-wide-x4-300s-round8-quad5
PYTHONPATH=src .venv/bin/python scripts/time_to_peer.py benchmarks/train-autoencoder-wide-x4-300s-round8-quad5/results.json
