"""One config per study: `get_config(arg)` returns the study's frozen dataclass.

The config is the run's identity (`experiments.config.identity`): it is what a run stores and
hashes into its workdir name. A new dataset or study is one module here (and, where needed, one
data loader in `diffpure_jax.data`).
"""
