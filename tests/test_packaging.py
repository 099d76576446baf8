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
    for module in ("moeexport/backends/__init__.py", "moeexport/calibration/observers.py", "moeexport/cli.py"):
        assert module in names
    for demo_file in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"):
        assert f"moeexport/demo/{demo_file}" in names


def test_the_mapped_packages_import_from_the_moeexport_namespace():
    import moeexport.backends
    import moeexport.calibration

    assert Path(moeexport.calibration.__file__).parent.name == "calibration"
    assert Path(moeexport.backends.__file__).parent.name == "backends"
