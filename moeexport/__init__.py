"""moeexport: compress Mixture-of-Experts LLMs and deploy them."""

from moeexport.errors import MoeExportError
from moeexport.modelio import load, load_tokenizer, save

__all__ = ["MoeExportError", "load", "load_tokenizer", "save"]
__version__ = "0.1.0"
