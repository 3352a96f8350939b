#!/usr/bin/env bash
# Every run behind experiments/results/fashion_mnist.md, in order. Each is resumable: rerun this
# script after a kill and finished rows are read back from their workdirs. Reduced protocol for a
# 2-core CPU (see the results file); FULL=1 runs the full protocol instead (a GPU is advised).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN="$PY -m experiments.fashion_mnist_autoattack --no-progress"
if [ "${FULL:-0}" = 1 ]; then
  N="--n-examples 512 --batch-size 64"
  N_UNDEFENDED="$N"
  DIFF="--dt 1e-3 --eot 20 --n-iter 100 --n-queries 5000"
  PGD="--dt 1e-3 --eot 20 --n-iter 200"
  BPDA="--dt 1e-3"
  SWEEP="$N --eot 20 --n-iter 200"
  STEPS_SWEEP=100
  SWEEP_TITLE="PGD-EOT (final iterate), exact grad., EOT 20, 200 iter., 512 images, 100 steps"
  ACC_N=10000
else
  N="--n-examples 32 --batch-size 16"
  N_UNDEFENDED="--n-examples 64 --batch-size 64"
  DIFF="--dt 1e-2 --eot 4 --n-iter 20 --n-queries 1000"
  PGD="--dt 1e-2 --eot 4 --n-iter 20"
  BPDA="--dt 1e-2 --eot 4 --n-iter 20"
  SWEEP="$N --eot 2 --n-iter 10"
  STEPS_SWEEP=10
  SWEEP_TITLE="PGD-EOT (final iterate), exact grad., EOT 2, 10 iter., 32 images, 10 steps"
  ACC_N=1000
fi

# Quality of the shipped models (clean and purified clean accuracy, samples from noise).
$PY -m experiments.fashion_mnist_report accuracy --n "$ACC_N" --dt 1e-3 --t-star 0.1 \
  --out experiments/results/fashion_mnist_accuracy.json
$PY -m experiments.fashion_mnist_report samples --n 36 --steps 1000

# The purified-accuracy bar. How much of the label survives to t* = 0.1: the WRN-16-1 fine-tuned
# on diffused images x_t*, scored on diffused test images (no purifier can do better than the
# best classifier of x_t*).
DIAG=workdirs/diag
train_once() {  # train_classifier refuses an --out that holds a checkpoint: skip finished ones
  local out="$1"; shift
  [ -d "$out/variables" ] || $PY -m experiments.train_classifier --no-progress --out "$out" "$@"
}
train_once $DIAG/fmnist-wrn-16-1-diffused --init-from checkpoints/fmnist-wrn-16-1 \
  --diffuse-t-star 0.1 --epochs 3 --lr 0.02
train_once $DIAG/fmnist-wrn-16-1-diffused-9ep --init-from $DIAG/fmnist-wrn-16-1-diffused \
  --diffuse-t-star 0.1 --epochs 6 --lr 0.02
$PY -m experiments.fashion_mnist_report diffused --classifier checkpoints/fmnist-wrn-16-1 \
  $DIAG/fmnist-wrn-16-1-diffused $DIAG/fmnist-wrn-16-1-diffused-9ep \
  --out experiments/results/fashion_mnist_diffused.json
# How much of the one-draw loss is the reverse SDE's randomness: 5 reverse solves from one x_t*.
$PY -m experiments.fashion_mnist_report reverse-draws --n 400 --draws 5 \
  --out experiments/results/fashion_mnist_reverse_draws.json
# Purification-aware fine-tuning on 1,600 purified training images (it did not help).
$PY -m experiments.purify_train_set --n 1600 --no-progress --out $DIAG/purified-train-1600
train_once $DIAG/fmnist-wrn-16-1-pa1600 --init-from checkpoints/fmnist-wrn-16-1 \
  --purified $DIAG/purified-train-1600 --purified-prob 1 --epochs 2 --lr 0.01
$PY -m experiments.fashion_mnist_report accuracy --n "$ACC_N" --dt 1e-3 --t-star 0.1 \
  --classifier checkpoints/fmnist-wrn-16-1 $DIAG/fmnist-wrn-16-1-pa1600

# Undefended and PGD adversarially trained classifiers: AutoAttack standard (full strength).
$RUN --rows undefended adv-trained $N_UNDEFENDED --n-iter 100 --n-queries 5000
# DiffPure: AutoAttack rand with the paper's adjoint gradients, then with exact gradients.
$RUN --rows diffpure $N $DIFF --version rand --grad adjoint
$RUN --rows diffpure $N $DIFF --version rand --grad exact \
  --protocols one_draw worst_of_10 majority_of_10 --workdir workdir/fmnist_exact
# DiffPure: PGD-EOT (exact gradients; stopping at the first success, and every step judged at
# the last iterate) and BPDA+EOT.
$RUN --rows diffpure $N $PGD --attack pgd-eot --grad exact \
  --protocols one_draw worst_of_10 majority_of_10
$RUN --rows diffpure $N $PGD --attack pgd-eot-final --grad exact \
  --protocols one_draw worst_of_10 majority_of_10
$RUN --rows diffpure $N $BPDA --attack bpda-eot
# t* sweep: PGD-EOT (final iterate) with exact gradients, the same number of reverse steps at
# every t* (so every point costs the same).
for T in 0.05 0.1 0.2 0.3; do
  DT=$($PY -c "print($T / $STEPS_SWEEP)")
  $RUN --rows diffpure $SWEEP --attack pgd-eot-final --grad exact --t-star "$T" --dt "$DT" \
    --protocols one_draw worst_of_10 majority_of_10 --workdir workdir/fmnist_sweep
done
$PY -m experiments.fashion_mnist_report sweep --workdirs workdir/fmnist_sweep/diffpure-* \
  --title "$SWEEP_TITLE"
$PY -m experiments.fashion_mnist_report grid \
  --workdir "$(ls -d workdir/fmnist_exact/diffpure-* | head -n 1)"
