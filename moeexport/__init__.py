"""moeexport: compress Mixture-of-Experts LLMs and deploy them.

    import moeexport
    report = moeexport.build("demo", "recipes/trim.yaml", "gguf", moeexport.BuildOptions(out="out/demo-gguf"))
    model = moeexport.load("out/demo-gguf/compressed")

`moeexport.pipeline` also has `compress`, `evaluate` and `validate`, each returning a report.
"""

from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_tokenizer, save
from moeexport.pipeline import BuildOptions, BuildReport, CalibrationOptions, CompressOptions, build

__all__ = ["BuildOptions", "BuildReport", "CalibrationOptions", "CompressOptions", "MoeExportError", "build", "load",
           "load_tokenizer", "save"]
__version__ = "0.1.0"
