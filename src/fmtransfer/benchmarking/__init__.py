"""Measurements the command line runs: a suite of experiments over seeds (`fmtransfer suite`, suite.py) and
what serving an export costs beside the FM path it replaces (`fmtransfer serve-bench`, serve.py).

The scripts that reproduce the figures in docs/ live outside the package, in benchmarks/.
"""
