"""The wheel installs backends/ and calibration/ inside moeexport and ships the demo model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_moeexport_package_and_the_demo_model(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("moeexport-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"moeexport", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    # every package in the source tree, mapped into the moeexport namespace
    sources = {"moeexport": REPO / "moeexport", "moeexport/backends": REPO / "backends",
               "moeexport/calibration": REPO / "calibration"}
    for prefix, root in sources.items():
        for init in root.rglob("__init__.py"):
            assert f"{prefix}/{init.relative_to(root).as_posix()}" in names, f"{init} is missing from the wheel"
    assert "moeexport/calibration/observers.py" in names
    assert "moeexport/backends/tensorrt/onnx_support_trt10.json" in names
    for demo_file in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert f"moeexport/demo/{demo_file}" in names


def test_the_mapped_packages_import_from_the_moeexport_namespace():
    import moeexport.backends
    import moeexport.calibration

    assert Path(moeexport.calibration.__file__).parent.name == "calibration"
    assert Path(moeexport.backends.__file__).parent.name == "backends"
