"""benchmarks/hop_trace.py keeps its stamps out of the product, in a patch applied to a copy:
the patch must still apply to the code as it is, and the stamps must only write when asked."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _hop_trace():
    spec = importlib.util.spec_from_file_location("hop_trace", ROOT / "benchmarks" / "hop_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stamps_patch_applies_to_the_package_and_writes_only_when_asked(tmp_path):
    copy = _hop_trace().traced_copy(tmp_path / "src")
    service = (copy / "ultrakv" / "cluster" / "service.py").read_text()
    assert "_hop('accept'" in service
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    probe = ("from ultrakv.cluster.hoptrace import hop; hop('x', 'r1'); hop('x', 'r1'); "
             "hop('y', 'r1', once=False); hop('y', 'r1', once=False)")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    subprocess.run([sys.executable, "-c", probe], env=env, check=True)  # not asked: no file
    assert list(stamps.iterdir()) == []
    subprocess.run([sys.executable, "-c", probe], env={**env, "ULTRAKV_HOPTRACE": str(stamps)}, check=True)
    (written,) = stamps.iterdir()
    labels = [line.split()[1:] for line in written.read_text().splitlines()]
    assert labels == [["x", "r1"], ["y", "r1"], ["y", "r1"]]
