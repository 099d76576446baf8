"""The GGUF weight types this target writes, their llama.cpp file-type ids and their tolerances.

Kept apart from the writer so that running a GGUF (the validation and profile processes) imports
neither torch nor the writer.
"""

from __future__ import annotations

from moeexport.validate import Tolerance

# gguf-py quantizes these in numpy ...
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# ... and llama.cpp's own quantizer (llama_model_quantize) writes the K-quant mixes, and any file with
# per-tensor type overrides. Its llama_ftype ids:
LLAMA_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
LLAMA_CPP_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
# ... and a GGUF input's own types: every tensor the model keeps carried as the input stores it (its codes)
KEEP = "keep"
QUANT_TYPES = NUMPY_TYPES + LLAMA_CPP_TYPES + (KEEP,)
# what a build must reach against the torch reference (F32 KV cache, flash attention off). F16 is judged
# like the other backends' f16, by KL and top-1, not by max |delta logit|: llama.cpp rounds activations to f16
# in F16 matmuls, which flips a router's top-k where two experts nearly tie, and that position's logits move by
# a whole expert's output (an 8x7B-width layer: one of 510 positions, router margin 1.7e-4, |delta| 2.83;
# every other position <= 0.008)
TOLERANCES = {
    "f32": Tolerance(max_abs_logit=1e-3, top1_agreement=1.0),
    "f16": Tolerance(kl=1e-3, top1_agreement=0.97),
    "bf16": Tolerance(kl=1e-3),
    "q8_0": Tolerance(kl=2e-3),
    "q4_0": Tolerance(kl=2e-2),
    "q4_k_m": Tolerance(kl=2e-2),
    "q5_k_m": Tolerance(kl=5e-3),
    "q6_k": Tolerance(kl=2e-3),
}
