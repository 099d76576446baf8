"""Differential check: our GGUF vs the file llama.cpp's own converter writes, both run in llama.cpp.

    python tools/compare_with_converter.py                 # the fixture in ../shared
    python tools/compare_with_converter.py --model demo --text held_out.txt

llama.cpp's convert_hf_to_gguf.py ships in the llama-cpp-python source
distribution (vendor/llama.cpp). This script downloads that sdist with pip (the
version installed here), runs the converter from a temporary directory with its
own gguf-py, writes our F32 GGUF of the same checkpoint, and reports the max
|delta logit| between the two files on held-out windows (exact llama.cpp
settings), plus the metadata keys on which the two files differ.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import transformers

from moeexport.backends import gguf as gguf_backend
from moeexport.evaluate import eval_windows
from moeexport.modelio import load, load_tokenizer, resolve_model_dir

SHARED = Path(__file__).resolve().parents[2] / "shared"


def fetch_converter(work: Path) -> Path:
    """The vendored llama.cpp tree (converter, conversion/, gguf-py) of the installed llama-cpp-python."""
    release = version("llama-cpp-python")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={release}", "-d", str(work)],
        check=True,
    )
    (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
    prefix = f"llama_cpp_python-{release}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        archive.extractall(work, members=members, filter="data")
    return work / prefix


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "fixtures" / "tiny-mixtral-books"))
    parser.add_argument("--text", default=str(SHARED / "corpus" / "dev.txt"))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=257)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    work = Path(tempfile.mkdtemp(prefix="moeexport-converter-"))
    llama_cpp_tree = fetch_converter(work)
    theirs = work / "converter-f32.gguf"
    converted = subprocess.run(
        [sys.executable, str(llama_cpp_tree / "convert_hf_to_gguf.py"), str(resolve_model_dir(args.model)),
         "--outtype", "f32", "--outfile", str(theirs)],
        env=os.environ | {"PYTHONPATH": str(llama_cpp_tree / "gguf-py")},
        capture_output=True,
        text=True,
    )
    if converted.returncode:
        sys.exit(f"llama.cpp's converter failed:\n{converted.stderr[-3000:]}")
    ours = gguf_backend.export(load(args.model), work / "moeexport-f32.gguf").path

    windows = eval_windows(load_tokenizer(args.model), args.text, args.length, args.windows)
    their_runner = gguf_backend.Runner(theirs, context=args.length)
    our_runner = gguf_backend.Runner(ours, context=args.length)
    worst = max(np.abs(their_runner.logits(w) - our_runner.logits(w)).max() for w in windows.tolist())
    print(f"{args.model}: max |delta logit| between the converter's GGUF and ours over "
          f"{windows.numel()} tokens: {worst:.3e}")

    their_keys, our_keys = metadata(theirs), metadata(ours)
    for key in sorted(set(their_keys) | set(our_keys)):
        a, b = their_keys.get(key, "<absent>"), our_keys.get(key, "<absent>")
        if str(a) != str(b):
            print(f"  metadata {key}: converter {str(a)[:70]!s} | ours {str(b)[:70]!s}")


if __name__ == "__main__":
    main()
