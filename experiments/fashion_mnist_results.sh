#!/usr/bin/env bash
# Every run behind experiments/results/fashion_mnist.md, in order. Each is resumable: rerun this
# script after a kill and finished rows are read back from their workdirs. Reduced protocol for a
# 2-core CPU (see the results file); FULL=1 runs the full protocol instead (a GPU is advised).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SIZE=$([ "${FULL:-0}" = 1 ] && echo full || echo reduced)
# Each attack study is a config (experiments/configs/fashion_mnist_autoattack.py): its settings
# at either size live there, not here.
RUN="$PY -m experiments.fashion_mnist_autoattack --no-progress --config"
ACC_N=$([ "$SIZE" = full ] && echo 10000 || echo 1000)  # images of the accuracy report

# Quality of the shipped models (clean and purified clean accuracy, samples from noise).
$PY -m experiments.reports.accuracy --n "$ACC_N" --dt 1e-3 --t-star 0.1 \
  --out experiments/results/fashion_mnist_accuracy.json
$PY -m experiments.reports.samples --n 36 --steps 1000

# The purified-accuracy bar. How much of the label survives to t* = 0.1: the WRN-16-1 fine-tuned
# on diffused images x_t*, scored on diffused test images (no purifier can do better than the
# best classifier of x_t*).
DIAG=workdir/diag
train_once() {  # train_classifier refuses an --out that holds a checkpoint: skip finished ones
  local out="$1"; shift
  [ -d "$out/variables" ] || $PY -m experiments.train_classifier --no-progress --out "$out" "$@"
}
train_once $DIAG/fmnist-wrn-16-1-diffused --init-from checkpoints/fmnist-wrn-16-1 \
  --diffuse-t-star 0.1 --epochs 3 --lr 0.02
train_once $DIAG/fmnist-wrn-16-1-diffused-9ep --init-from $DIAG/fmnist-wrn-16-1-diffused \
  --diffuse-t-star 0.1 --epochs 6 --lr 0.02
$PY -m experiments.reports.diffused --classifier checkpoints/fmnist-wrn-16-1 \
  $DIAG/fmnist-wrn-16-1-diffused $DIAG/fmnist-wrn-16-1-diffused-9ep \
  --out experiments/results/fashion_mnist_diffused.json
# How much of the one-draw loss is the reverse SDE's randomness: 5 reverse solves from one x_t*.
$PY -m experiments.reports.reverse_draws --n 400 --draws 5 \
  --out experiments/results/fashion_mnist_reverse_draws.json

# Undefended and PGD adversarially trained classifiers: AutoAttack standard (full strength).
$RUN "undefended,$SIZE"
# DiffPure: AutoAttack rand with the paper's adjoint gradients, then with exact gradients.
$RUN "adjoint,$SIZE"
$RUN "exact,$SIZE"
# DiffPure: PGD-EOT (exact gradients; stopping at the first success, and every step judged at
# the last iterate) and BPDA+EOT.
$RUN "pgd,$SIZE"
$RUN "pgd-final,$SIZE"
$RUN "bpda,$SIZE"
# Unseen threats (the paper's Table 5 study): DiffPure with exact gradients and the PGD(Linf)-
# trained classifier, each under Linf, L2 and StAdv.
for threat in Linf L2 StAdv; do $RUN "unseen,$SIZE,$threat"; done
# The strongest attacks (issue 16): DiffPure with exact gradients under AutoAttack rand, PGD-EOT
# at the final iterate, DiffAttack, DiffHammer and AutoAttack rand with a large EOT, on the same
# 64 images, each judged by one draw and the worst and the majority of 10; then their cost.
$RUN "strongest,$SIZE"
STRONGEST=workdir/fmnist_strongest$([ "$SIZE" = full ] && echo _full || true)
$PY -m experiments.reports.attack_cost --workdirs $STRONGEST/diffpure-* \
  --out experiments/results/fashion_mnist_strongest.json
# Certified robustness: diffusion denoised smoothing of the shipped models at sigma 0.25 and 0.5.
CERTIFY="$PY -m experiments.certify --no-progress --config"
for sigma in 0.25 0.5; do $CERTIFY "fmnist,$SIZE,sigma$sigma"; done
CERT_ROOT=workdir/fmnist_certify
$PY -m experiments.reports.certify_curve --workdirs $CERT_ROOT/certify-* \
  --json experiments/results/fashion_mnist_certified.json
# t* sweep: PGD-EOT (final iterate) with exact gradients, the same number of reverse steps at
# every t* (so every point costs the same).
$RUN "sweep,$SIZE"
$PY -m experiments.reports.sweep --workdirs workdir/fmnist_sweep/diffpure-*
$PY -m experiments.reports.grid \
  --workdir "$(ls -d workdir/fmnist_exact/diffpure-* | head -n 1)"
