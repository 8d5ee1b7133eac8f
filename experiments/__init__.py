"""Experiments harness for jaxsparse: data, models, configs, the training entry point,
checkpoints, sweeps, plots and benchmarks. See ``python -m experiments.quickstart``."""
