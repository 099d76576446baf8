"""Run an artifact in a fresh process, so that its memory is the runtime's alone (no torch model beside it).

    python -m moeexport.backends.profile '{"target": "onnx", "path": "m.onnx", "prompt": [1, 2, 3], "new_tokens": 64}'

(or the request on stdin, with "-" as the argument: how moeexport calls it, since a long prompt does not fit
a command line)

prints the target runner's `profile` numbers as JSON, plus the process's peak resident memory
(peak_rss_bytes, Python and torch included: ~200 MiB that a deployment would not load) and the
resident memory the runtime holds after decoding (runtime_rss_bytes: weights, KV cache, arenas).
"threads" (optional) sets the CPU threads the runtime computes with (default: every core).
The target "torch" runs a checkpoint directory (or "demo") in torch eager, as moeexport.load gives it,
through validate.TorchRunner; its runtime_rss_bytes leave out torch's own libraries.
With "windows" and "logits" (.npy paths) instead of a prompt, it writes the runner's logits of
each window: a streamed build validates that way, so the artifact's runtime and the build's
torch process never hold their weights at the same time.

A MoeExportError in the child (a file the runtime cannot load, a prompt that does not fit) is its
one line on stderr and exit status 2; the parent raises it again with the file named.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from moeexport.errors import MoeExportError


TORCH = "torch"  # the target name of a checkpoint run in torch eager (no backends/ target: nothing is exported)


def profile_in_subprocess(target: str, path: str | Path, prompt: list[int], new_tokens: int = 64,
                          context: int = 512, threads: int | None = None) -> dict:
    """The runtime's speed and memory, and `machine_load`: whether other work was ready to run just before the
    fresh process started (then the speeds are not the machine's)."""
    from moeexport.machine_load import judge, other_load, usable_cores
    from moeexport.threads import default_threads

    request = json.dumps({"target": target, "path": str(path), "prompt": prompt, "new_tokens": new_tokens,
                          "context": context, "threads": threads})
    load = other_load()
    # on stdin: a long prompt as an argument exceeds the system's limit on a command line ("-" says so)
    done = subprocess.run([sys.executable, "-m", "moeexport.backends.profile", "-"], input=request,
                          capture_output=True, text=True)
    if done.returncode:
        raise MoeExportError(f"profiling {path} failed: {_last_line(done.stderr)}")
    return json.loads(done.stdout) | {"machine_load": judge(load, usable_cores(), threads or default_threads()).to_dict()}


def _last_line(stderr: str) -> str:
    """The child's reason: its last line (a MoeExportError's message, or a traceback's exception line)."""
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "the process ended without saying why"


def logits_in_subprocess(target: str, path: str | Path, windows, context: int) -> tuple[object, int]:
    """(the artifact's logits of token windows [N, L] as a validate.RecordedReference, the child's peak RSS
    bytes). The child writes them a window at a time to a temporary file, which the reference reads a window
    at a time: neither process holds all the float32 logits [N, L, vocab]."""
    import tempfile

    import numpy as np

    from moeexport.validate import spilled_reference

    windows = np.asarray(windows, dtype=np.int64)
    peak = []

    def run(logits: str) -> None:
        with tempfile.TemporaryDirectory(prefix="moeexport-windows-") as scratch:
            inputs = Path(scratch) / "windows.npy"
            np.save(inputs, windows)
            request = json.dumps({"target": target, "path": str(path), "context": context, "windows": str(inputs),
                                  "logits": logits})
            done = subprocess.run([sys.executable, "-m", "moeexport.backends.profile", request],
                                  capture_output=True, text=True)
        if done.returncode:
            raise MoeExportError(f"running {path} failed: {_last_line(done.stderr)}")
        peak.append(json.loads(done.stdout)["peak_rss_bytes"])

    return spilled_reference(windows, run), peak[0]


def main() -> None:
    try:
        _serve(json.loads(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1]))
    except MoeExportError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def _serve(request: dict) -> None:
    from moeexport.backends import target_for

    if request["target"] == TORCH:
        print(json.dumps(_profile_torch(request)))
        return
    target = target_for(request["target"])
    if "windows" in request:
        import numpy as np

        from moeexport.validate import write_logit_blocks

        runner = target.runner(request["path"], request["context"])
        windows = np.load(request["windows"], allow_pickle=False)
        write_logit_blocks(request["logits"], len(windows),
                           ((i, runner.logits(window)[None]) for i, window in enumerate(windows.tolist())))
        print(json.dumps({"peak_rss_bytes": _peak_resident_bytes()}))
        return
    from moeexport.memory import resident_bytes

    before = resident_bytes()
    runner = target.serving_runner(request["path"], request["context"], threads=request.get("threads"))
    print(json.dumps(_measured(runner, request, before)))


def _profile_torch(request: dict) -> dict:
    import torch  # before `before`: the runtime's memory is the model's and its activations', not torch's libraries
    from transformers.utils import logging

    from moeexport.memory import resident_bytes
    from moeexport.modelio import load
    from moeexport.threads import default_threads
    from moeexport.validate import TorchRunner

    logging.disable_progress_bar()  # stderr carries only a failure's reason
    logging.set_verbosity_error()
    torch.set_num_threads(request.get("threads") or default_threads())
    before = resident_bytes()
    return _measured(TorchRunner(load(request["path"])), request, before)


def _measured(runner, request: dict, before: int) -> dict:
    from moeexport.memory import resident_bytes
    from moeexport.threads import default_threads

    result = runner.profile(request["prompt"], request["new_tokens"])
    result["runtime_rss_bytes"] = resident_bytes() - before
    result["peak_rss_bytes"] = _peak_resident_bytes()
    result["threads"] = request.get("threads") or default_threads()
    return result


def _peak_resident_bytes() -> int:
    """This process's peak resident memory since it started its program.

    /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a profile
    started from a 14 GB build process reported a 14 GB peak of its own.
    """
    from moeexport.memory import peak_resident_bytes

    return peak_resident_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


if __name__ == "__main__":
    main()
