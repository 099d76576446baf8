"""The ONNX weight types this target writes, its MoE lowerings and its tolerances.

Kept apart from the writer so that the target's package (its options, read by the command line)
imports neither torch nor the writer.
"""

from __future__ import annotations

from moeexport.validate import Tolerance

QUANT_TYPES = ("f32", "f16", "int8", "int4")
MOE_OPS = ("contrib", "plain", "plain-routed")
DEFAULT_BLOCK_SIZE = 32

# f32 graphs compute what torch computes up to summation order; f16 rounds every weight;
# int8 QMoE on onnxruntime >= 1.31 also quantizes activations to int8 (research/onnx_trt.md §1.6).
TOLERANCES = {
    "f32": Tolerance(max_abs_logit=1e-4, top1_agreement=1.0),
    "f16": Tolerance(kl=1e-3, top1_agreement=0.97),
    "int8": Tolerance(kl=5e-3, top1_agreement=0.93),
    "int4": Tolerance(kl=0.1, top1_agreement=0.75),
}
