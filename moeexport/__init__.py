"""moeexport: compress Mixture-of-Experts LLMs and deploy them.

    import moeexport
    report = moeexport.build("demo", "recipes/trim.yaml", "gguf",
                             moeexport.BuildOptions(out="out/demo-gguf", save_checkpoint=True))
    model = moeexport.load("out/demo-gguf/compressed")

`moeexport.pipeline` also has `compress`, `evaluate` and `validate`, each returning a report.
The names below are imported when first used, so that the command line can refuse bad input
(a model that cannot fit --max-memory) before torch is imported.
"""

from importlib import import_module

from moeexport.errors import MoeExportError

_LAZY = {"load": "moeexport.modelio", "load_tokenizer": "moeexport.modelio", "save": "moeexport.modelio",
         "BuildOptions": "moeexport.pipeline", "BuildReport": "moeexport.pipeline",
         "CalibrationOptions": "moeexport.pipeline", "CompressOptions": "moeexport.pipeline",
         "build": "moeexport.pipeline"}

__all__ = ["BuildOptions", "BuildReport", "CalibrationOptions", "CompressOptions", "MoeExportError", "build", "load",
           "load_tokenizer", "save"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeexport' has no attribute {name!r}")
