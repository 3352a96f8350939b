"""Quality checks and figures for the Fashion-MNIST models and results, one module per report.

    python -m experiments.reports.samples        # grid of samples from pure noise (PNG)
    python -m experiments.reports.accuracy       # clean and purified clean accuracy
    python -m experiments.reports.diffused       # accuracy on diffused images x_t*
    python -m experiments.reports.reverse_draws  # one draw against a vote of reverse draws
    python -m experiments.reports.grid --workdir workdir/fmnist/diffpure-...
                                                 # clean / adversarial / purified (PNG)
    python -m experiments.reports.sweep --workdirs W1 W2 ...
                                                 # clean and robust accuracy against t* (PNG)

Figures and JSON numbers go to experiments/results/, next to the results page that cites them
(experiments/results/fashion_mnist.md); `experiments/fashion_mnist_results.sh` runs every report
behind that page. The purified test images of `accuracy` and `reverse_draws` are kept under
workdir/purified/ (`diffpure_jax.purified`), so a rerun reads them back. The PNGs need the
`figures` extra (matplotlib). Shared helpers: `common.py`.
"""
