"""Profile a GGUF in a fresh process, so that its peak memory is llama.cpp's alone (no torch).

    python -m moeexport.backends.gguf.profile '{"path": "m.gguf", "prompt": [1, 2, 3], "new_tokens": 64}'

prints the GGUFRunner.profile numbers plus peak_rss_bytes as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from moeexport.errors import MoeExportError


def profile_in_subprocess(path: str | Path, prompt: list[int], new_tokens: int = 64, context: int = 512) -> dict:
    request = json.dumps({"path": str(path), "prompt": prompt, "new_tokens": new_tokens, "context": context})
    done = subprocess.run(
        [sys.executable, "-m", "moeexport.backends.gguf.profile", request], capture_output=True, text=True
    )
    if done.returncode:
        raise MoeExportError(f"profiling {path} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main() -> None:
    from moeexport.backends.gguf.runner import GGUFRunner

    request = json.loads(sys.argv[1])
    runner = GGUFRunner(request["path"], context=request["context"], exact=False)
    result = runner.profile(request["prompt"], request["new_tokens"])
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(result))


if __name__ == "__main__":
    main()
