"""The example every command uses trains for real: a few epochs reach a useful accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


def test_train_script_learns_and_saves_a_model(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--epochs", "4", "--output-dir", str(tmp_path / "outputs")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    accuracies = [float(a) for a in re.findall(r"val_acc (\d\.\d+)", out.stdout)]
    assert len(accuracies) == 4
    assert accuracies[-1] > 0.8, out.stdout
    assert (tmp_path / "outputs" / "model.npz").stat().st_size > 1000


def test_environment_file_names_the_local_base_and_pip_packages():
    spec = yaml.safe_load((EXAMPLE / "environment.yml").read_text())
    assert spec["docker"]["base_image"].startswith("dockyard/base:")
    assert set(spec["python"]["pip_requirements"]) == {"numpy", "scikit-learn"}
