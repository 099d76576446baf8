"""The GGUF target: files that stock llama.cpp runs. Installed as moeexport.backends.gguf."""

from moeexport.backends.gguf.architectures import ARCHITECTURES
from moeexport.backends.gguf.profile import profile_in_subprocess as profile
from moeexport.backends.gguf.runner import GGUFRunner
from moeexport.backends.gguf.writer import QUANT_TYPES, TOLERANCES, GGUFExport, check, export

EXTENSION = "gguf"
Runner = GGUFRunner

__all__ = ["ARCHITECTURES", "GGUFExport", "GGUFRunner", "profile", "QUANT_TYPES", "TOLERANCES", "check", "export"]
