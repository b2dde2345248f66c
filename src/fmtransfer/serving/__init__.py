"""Serving an exported student: its manifest, the file formats, and a loader free of training code.

`from fmtransfer.serving import load_predictor` is all a server needs; `fmtransfer.export` writes the
folders it reads, `fmtransfer.benchmarking.serve` measures them against the FM teacher they replace.
"""

from fmtransfer.serving.loader import Predictor, load_predictor, load_student
from fmtransfer.serving.manifest import ExportError, Manifest, read_manifest

__all__ = ["ExportError", "Manifest", "Predictor", "load_predictor", "load_student", "read_manifest"]
