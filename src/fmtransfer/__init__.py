"""fmtransfer: transfer the knowledge of foundation models into small, fast application models."""

from fmtransfer.config import RunConfig, load_config
from fmtransfer.errors import ConfigError, DataError, FmtError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FmtError", "RunConfig", "__version__", "load_config"]
