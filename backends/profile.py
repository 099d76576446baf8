"""Run an artifact in a fresh process, so that its memory is the runtime's alone (no torch, no model).

    python -m moeexport.backends.profile '{"target": "onnx", "path": "m.onnx", "prompt": [1, 2, 3], "new_tokens": 64}'

prints the target runner's `profile` numbers as JSON, plus the process's peak resident memory
(peak_rss_bytes, Python and torch included: ~200 MiB that a deployment would not load) and the
resident memory the runtime holds after decoding (runtime_rss_bytes: weights, KV cache, arenas).
With "windows" and "logits" (.npy paths) instead of a prompt, it writes the runner's logits of
each window: a streamed build validates that way, so the artifact's runtime and the build's
torch process never hold their weights at the same time.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from moeexport.errors import MoeExportError


def profile_in_subprocess(target: str, path: str | Path, prompt: list[int], new_tokens: int = 64,
                          context: int = 512) -> dict:
    request = json.dumps(
        {"target": target, "path": str(path), "prompt": prompt, "new_tokens": new_tokens, "context": context}
    )
    done = subprocess.run([sys.executable, "-m", "moeexport.backends.profile", request], capture_output=True, text=True)
    if done.returncode:
        raise MoeExportError(f"profiling {path} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def logits_in_subprocess(target: str, path: str | Path, windows, context: int) -> tuple[object, int]:
    """(the artifact's float32 logits [N, L, vocab] of token windows [N, L], the child's peak RSS bytes)."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="moeexport-logits-") as scratch:
        inputs, outputs = Path(scratch) / "windows.npy", Path(scratch) / "logits.npy"
        np.save(inputs, np.asarray(windows, dtype=np.int64))
        request = json.dumps({"target": target, "path": str(path), "context": context, "windows": str(inputs),
                              "logits": str(outputs)})
        done = subprocess.run([sys.executable, "-m", "moeexport.backends.profile", request], capture_output=True,
                              text=True)
        if done.returncode:
            raise MoeExportError(f"running {path} failed: {done.stderr.strip().splitlines()[-1:]}")
        return np.load(outputs), json.loads(done.stdout)["peak_rss_bytes"]


def main() -> None:
    from moeexport.backends import target_for

    request = json.loads(sys.argv[1])
    target = target_for(request["target"])
    if "windows" in request:
        import numpy as np

        runner = target.runner(request["path"], request["context"])
        windows = np.load(request["windows"], allow_pickle=False)
        np.save(request["logits"], np.stack([runner.logits(window) for window in windows.tolist()]))
        print(json.dumps({"peak_rss_bytes": _peak_resident_bytes()}))
        return
    from moeexport.memory import resident_bytes

    before = resident_bytes()
    runner = target.serving_runner(request["path"], request["context"])
    result = runner.profile(request["prompt"], request["new_tokens"])
    result["runtime_rss_bytes"] = resident_bytes() - before
    result["peak_rss_bytes"] = _peak_resident_bytes()
    print(json.dumps(result))


def _peak_resident_bytes() -> int:
    """This process's peak resident memory since it started its program.

    /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a profile
    started from a 14 GB build process reported a 14 GB peak of its own.
    """
    from moeexport.memory import peak_resident_bytes

    return peak_resident_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


if __name__ == "__main__":
    main()
