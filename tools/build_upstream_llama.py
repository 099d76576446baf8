"""Build llama.cpp's own `llama-quantize` (and `llama-imatrix`) against the llama.cpp this Python runs, for
tests/test_imatrix_file.py.

    python tools/build_upstream_llama.py OUT [--source DIR] [--imatrix]
    export MOEEXPORT_UPSTREAM_LLAMA=OUT   # (the script prints this line)

llama-cpp-python ships llama.cpp's libraries (libllama, libggml) but not its tools, and no prebuilt llama.cpp
release runs here (llama-cpp-py-sync's wheel holds libraries only). The tool's own sources do: llama-quantize is
tools/quantize/{main,quantize}.cpp plus the few common/ files its imatrix loader needs, compiled with g++ and
linked to the installed llama_cpp/lib, so it is the very llama.cpp build our tests run (seconds to build).
`--imatrix` also builds llama-imatrix, which needs all of common/ (argument parsing pulls in chat templates and
downloads): minutes on two cores. `--source` is a llama.cpp checkout or an unpacked llama-cpp-python sdist
(vendor/llama.cpp); by default the sdist of the installed llama-cpp-python is fetched with pip.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# what llama-quantize compiles from llama.cpp's tree (common/json.cpp: common.cpp's JSON helpers)
SOURCES = ("tools/quantize/main.cpp", "tools/quantize/quantize.cpp", "common/imatrix-loader.cpp", "common/log.cpp",
           "common/common.cpp", "common/json.cpp")
INCLUDES = ("include", "ggml/include", "common", "vendor", "vendor/cpp-httplib", "tools/quantize")


def llama_cpp_tree(source: Path | None, work: Path) -> Path:
    """The llama.cpp source tree: given, or from the installed llama-cpp-python's sdist."""
    if source is None:
        import llama_cpp

        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                        f"llama-cpp-python=={llama_cpp.__version__}"], check=True)
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(work, filter="data")
        source = next(path for path in work.iterdir() if path.is_dir())
    vendored = source / "vendor" / "llama.cpp"
    return vendored if vendored.is_dir() else source


def imatrix_sources(tree: Path) -> list[str]:
    """llama-imatrix: its own file, all of common/ but the optional llguidance, and the HTTP client it links."""
    common = sorted(str(path.relative_to(tree)) for path in (tree / "common").rglob("*.cpp")
                    if path.name != "llguidance.cpp")
    return ["tools/imatrix/imatrix.cpp", *common, "vendor/cpp-httplib/httplib.cpp"]


def build(tree: Path, out: Path, work: Path, name: str, sources: list[str]) -> Path:
    import llama_cpp

    libraries = Path(llama_cpp.__file__).parent / "lib"
    template = (tree / "common" / "build-info.cpp.in").read_text()
    for key, value in (("LLAMA_BUILD_NUMBER", "0"), ("LLAMA_BUILD_COMMIT", f"llama-cpp-python {llama_cpp.__version__}"),
                       ("BUILD_COMPILER", "g++"), ("BUILD_TARGET", "host")):
        template = template.replace(f"@{key}@", value)
    (work / "build-info.cpp").write_text(template)
    # function sections and --gc-sections drop the common/ code the tool never calls, and with it its references
    # to the rest of common/ (chat templates, downloads)
    compile_flags = ["-std=c++17", "-O1", "-ffunction-sections", "-fdata-sections",
                     *(f"-I{tree / include}" for include in INCLUDES)]

    def compiled(source: Path) -> str:
        target = work / f"{name}-{'_'.join(source.parts[-3:])}.o"
        subprocess.run(["g++", *compile_flags, "-c", str(source), "-o", str(target)], check=True)
        return str(target)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objects = list(pool.map(compiled, [tree / source for source in sources] + [work / "build-info.cpp"]))
    out.mkdir(parents=True, exist_ok=True)
    binary = out / name
    subprocess.run(["g++", *objects, f"-L{libraries}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{libraries}",
                    "-Wl,--gc-sections", "-pthread", "-o", str(binary)], check=True)
    usage = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    if "usage" not in (usage.stdout + usage.stderr).lower():
        sys.exit(f"{binary} does not run: {usage.stderr.strip()}")
    return binary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="directory for the binary (MOEEXPORT_UPSTREAM_LLAMA)")
    parser.add_argument("--source", type=Path, help="llama.cpp checkout or unpacked llama-cpp-python sdist")
    parser.add_argument("--imatrix", action="store_true", help="also build llama-imatrix (minutes)")
    args = parser.parse_args()
    if shutil.which("g++") is None:
        sys.exit("g++ is needed to build llama.cpp's tools")
    with tempfile.TemporaryDirectory() as work:
        tree = llama_cpp_tree(args.source, Path(work))
        build(tree, args.out.resolve(), Path(work), "llama-quantize", list(SOURCES))
        if args.imatrix:
            build(tree, args.out.resolve(), Path(work), "llama-imatrix", imatrix_sources(tree))
    print(f"export MOEEXPORT_UPSTREAM_LLAMA={args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
