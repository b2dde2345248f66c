"""`python -m fmtransfer ...` (and `torchrun ... -m fmtransfer run ...`)."""

import sys

from fmtransfer.cli import main

sys.exit(main())
