"""Running a test file's Triton kernels on a machine without a GPU: the file runs itself again
in a subprocess under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def triton_importable() -> bool:
    """Whether Triton is installed (CI installs it; the interpreter needs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run_under_interpreter(test_file: str) -> str:
    """Run ``test_file`` under the interpreter; fails with its output if pytest failed there,
    else returns that output (the caller checks what ran)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", test_file],
        env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout
