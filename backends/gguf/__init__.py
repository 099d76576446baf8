"""The GGUF target: files that stock llama.cpp runs. Installed as moeexport.backends.gguf."""

from functools import partial

from moeexport.backends.gguf.architectures import ARCHITECTURES
from moeexport.backends.gguf.runner import GGUFRunner
from moeexport.backends.gguf.writer import QUANT_TYPES, TOLERANCES, GGUFExport, check, export
from moeexport.backends.profile import profile_in_subprocess

EXTENSION = "gguf"
Runner = GGUFRunner
PROFILE_RUNNER_OPTIONS = {"exact": False}  # the KV cache and attention llama.cpp would serve with
profile = partial(profile_in_subprocess, "gguf")

__all__ = ["ARCHITECTURES", "GGUFExport", "GGUFRunner", "profile", "QUANT_TYPES", "TOLERANCES", "check", "export"]
