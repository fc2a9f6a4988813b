"""Reading an exported checkpoint back, from its files alone (its shipped code is never imported):
``verification`` (``verify``: the sha256 of every file, the patch digest; ``shipped_code_differs``),
``report`` (``describe``: what ``inspect`` prints) and ``restoration`` (``restore``: the exact base
model back). The public names are importable from here."""

from editor.checkpoint.verification import (INDEX, Report, expected_patch_tensors, is_onnx_export, is_patch_tensor,
                                            load_tensors, require_ok, shipped_code_differs, verified, verify,
                                            weight_files)
from editor.checkpoint.report import describe
from editor.checkpoint.restoration import restore, unpermute_plan

__all__ = ["INDEX", "Report", "describe", "expected_patch_tensors", "is_onnx_export", "is_patch_tensor", "load_tensors",
           "require_ok", "restore", "shipped_code_differs", "unpermute_plan", "verified", "verify", "weight_files"]
