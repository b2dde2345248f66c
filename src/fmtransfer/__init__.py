"""fmtransfer: transfer the knowledge of foundation models into small, fast application models.

Python API (`import fmtransfer as ft`): `ft.load_config(path, overrides)`, `ft.run(config, out=..., overrides=...,
data=...)` -> `ft.Result` (metrics, run_dir, model, predict); see fmtransfer.api.
"""

from typing import Any

from fmtransfer.config import RunConfig, load_config
from fmtransfer.errors import ConfigError, DataError, FmtError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FmtError", "Result", "RunConfig", "__version__", "load_config", "run"]


def run(*args: Any, **kwargs: Any) -> Any:
    """Run one experiment and return its Result: see fmtransfer.api.run (same arguments)."""
    from fmtransfer.api import run as _run

    return _run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Result":
        from fmtransfer.api import Result

        return Result
    raise AttributeError(f"module 'fmtransfer' has no attribute {name!r}")
