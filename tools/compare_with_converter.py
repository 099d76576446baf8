"""Differential check: our GGUF vs the file llama.cpp's own converter writes, both run in llama.cpp.

    python tools/compare_with_converter.py                 # the fixture in ../shared
    python tools/compare_with_converter.py --model demo --text held_out.txt
    python tools/compare_with_converter.py --model DIR --outtype f16 --tensors --sentencepiece-vocab

llama.cpp's convert_hf_to_gguf.py ships in the llama-cpp-python source
distribution (vendor/llama.cpp). This script downloads that sdist with pip (the
version installed here), runs the converter from a temporary directory with its
own gguf-py, writes our F32 GGUF of the same checkpoint, and reports the max
|delta logit| between the two files on held-out windows (exact llama.cpp
settings), plus the metadata keys on which the two files differ. `--tensors` also
compares the two files tensor for tensor (names, types, shapes, bytes; for
unequal bytes the max |difference|). `--sentencepiece-vocab` has the converter
read the checkpoint's SentencePiece tokenizer.model whatever its model class
would read: tiny test models borrow the demo's, which the vocabulary readers of
e.g. DeepSeek's and GLM's classes do not know.
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
from moeexport.errors import MoeExportError
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


# runs the converter with every text model class reading the checkpoint's SentencePiece vocabulary
SENTENCEPIECE_CONVERTER = """
import sys
import convert_hf_to_gguf as converter
chosen = converter.get_model_class
def with_sentencepiece(name, mmproj=False):
    model_class = chosen(name, mmproj)
    if not mmproj:
        model_class.set_vocab = model_class._set_vocab_sentencepiece
    return model_class
converter.get_model_class = with_sentencepiece
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
converter.main()
"""


def tensor_differences(theirs: Path, ours: Path) -> list[str]:
    """One line per tensor whose name, type, shape or bytes differ between the two files."""
    from gguf import GGUFReader

    their_tensors = {t.name: t for t in GGUFReader(theirs).tensors}
    our_tensors = {t.name: t for t in GGUFReader(ours).tensors}
    lines = []
    for name in sorted(set(their_tensors) | set(our_tensors)):
        a, b = their_tensors.get(name), our_tensors.get(name)
        if a is None or b is None:
            lines.append(f"  tensor {name}: {'only ours' if a is None else 'only the converter'}")
        elif a.tensor_type != b.tensor_type or list(a.shape) != list(b.shape):
            lines.append(f"  tensor {name}: converter {a.tensor_type.name} {list(a.shape)} | "
                         f"ours {b.tensor_type.name} {list(b.shape)}")
        elif not np.array_equal(np.asarray(a.data), np.asarray(b.data)):
            worst = np.abs(np.asarray(a.data, np.float64) - np.asarray(b.data, np.float64)).max()
            lines.append(f"  tensor {name}: bytes differ, max |difference| {worst:.3e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "fixtures" / "tiny-mixtral-books"))
    parser.add_argument("--text", default=str(SHARED / "corpus" / "dev.txt"))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=257)
    parser.add_argument("--outtype", choices=("f32", "f16"), default="f32", help="both files' weight type")
    parser.add_argument("--tensors", action="store_true", help="also compare the files tensor for tensor")
    parser.add_argument("--sentencepiece-vocab", action="store_true",
                        help="the converter reads the checkpoint's tokenizer.model whatever its model class")
    parser.add_argument("--work", help="directory for the sdist and both files (default: a temporary one)")
    parser.add_argument("--llama-cpp-tree", help="an unpacked vendor/llama.cpp of the installed llama-cpp-python "
                                                 "(its converter, conversion/, gguf-py) instead of downloading it")
    parser.add_argument("--converter-arg", action="append", default=[],
                        help="passed to the converter as it is, e.g. --converter-arg=--no-mtp for a Qwen3.5 or GLM "
                             "checkpoint without next-token-prediction layers (moeexport writes none)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    work = Path(args.work or tempfile.mkdtemp(prefix="moeexport-converter-"))
    work.mkdir(parents=True, exist_ok=True)
    llama_cpp_tree = Path(args.llama_cpp_tree) if args.llama_cpp_tree else fetch_converter(work)
    theirs = work / f"converter-{args.outtype}.gguf"
    script = (["-c", SENTENCEPIECE_CONVERTER] if args.sentencepiece_vocab
              else [str(llama_cpp_tree / "convert_hf_to_gguf.py")])
    converted = subprocess.run(
        [sys.executable, *script, str(resolve_model_dir(args.model)), "--outtype", args.outtype,
         "--outfile", str(theirs), *args.converter_arg],
        env=os.environ | {"PYTHONPATH": os.pathsep.join([str(llama_cpp_tree), str(llama_cpp_tree / "gguf-py")])},
        capture_output=True,
        text=True,
    )
    if converted.returncode:
        sys.exit(f"llama.cpp's converter failed:\n{converted.stderr[-3000:]}")
    ours = gguf_backend.export(load(args.model), work / f"moeexport-{args.outtype}.gguf", quant=args.outtype,
                               overwrite=True).path

    windows = eval_windows(load_tokenizer(args.model), args.text, args.length, args.windows)
    our_runner = gguf_backend.Runner(ours, context=args.length)
    try:
        their_runner = gguf_backend.Runner(theirs, context=args.length)
    except MoeExportError as error:  # still worth comparing key for key and tensor for tensor
        print(f"{args.model}: the converter's GGUF does not run: {error}")
    else:
        worst = max(np.abs(their_runner.logits(w) - our_runner.logits(w)).max() for w in windows.tolist())
        print(f"{args.model}: max |delta logit| between the converter's GGUF and ours over "
              f"{windows.numel()} tokens: {worst:.3e}")

    their_keys, our_keys = metadata(theirs), metadata(ours)
    for key in sorted(set(their_keys) | set(our_keys)):
        a, b = their_keys.get(key, "<absent>"), our_keys.get(key, "<absent>")
        if str(a) != str(b):
            print(f"  metadata {key}: converter {str(a)[:70]!s} | ours {str(b)[:70]!s}")
    if args.tensors:
        differences = tensor_differences(theirs, ours)
        print(f"tensors: {len(differences)} differ" + "".join(f"\n{line}" for line in differences))


if __name__ == "__main__":
    main()
