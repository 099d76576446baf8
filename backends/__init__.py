"""Deployment targets, one package per format; installed as moeexport.backends.

Each target package defines one `Target` (backends/target.py: name,
extension, weight types, tolerances, strict options, check, export, runner,
profile, finish, and the hooks other rooms size and compare through) as its
module attribute `TARGET`. `PACKAGES` is the registry: what the command line
offers (`--target`, each target's option flags), what bench runs and search
sizes are read from it. `target_for(name)` imports only the package asked for,
so a missing runtime of another target never matters; importing a target
package is cheap and imports neither torch nor its runtime (its writer and
runner are imported when used), so the command line can read every target's
`Options` before any work.
"""

import importlib

from moeexport.errors import MoeExportError

PACKAGES = {"gguf": "moeexport.backends.gguf", "onnx": "moeexport.backends.onnx", "tensorrt": "moeexport.backends.tensorrt"}


def target_names() -> tuple[str, ...]:
    """Every registered target, in the order the command line lists them."""
    return tuple(PACKAGES)


def target_for(name: str):
    """The Target for a name, or a one-line error listing the targets."""
    if name not in PACKAGES:
        raise MoeExportError(f"unknown target {name!r}; targets: {', '.join(target_names())}")
    return importlib.import_module(PACKAGES[name]).TARGET


def runnable_suffixes() -> dict[str, str]:
    """Artifact suffix -> the target whose runner loads such a file alone (validate, bench)."""
    return {f".{target.extension}": name for name in PACKAGES if (target := target_for(name)).runs_files}


def model_reader(path):
    """The module that reads the artifact file `path` back as a model (a GGUF given as MODEL), by its suffix."""
    return target_for(target_of_file(path)).model_reader()


def target_of_file(path) -> str:
    """The target that runs an artifact file, from its suffix."""
    from pathlib import Path

    runnable = runnable_suffixes()
    suffix = Path(path).suffix
    if suffix not in runnable:
        raise MoeExportError(f"{path}: this command runs {' and '.join(runnable)} artifacts")
    return runnable[suffix]
