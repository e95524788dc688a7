"""tvsprune: prune trained CNNs with TVSPrune and export them for deployment.

Pipeline stages (each a CLI subcommand and a Python API, file -> file):
calibrate -> prune -> export -> bench, and `run` / `demo` for all of them.
"""
__version__ = "0.1.0"
