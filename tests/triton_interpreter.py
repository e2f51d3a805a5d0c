"""Running a test file's Triton kernels on a machine without a GPU: the file runs itself again
in a subprocess under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os
import re
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


def assert_passes_under_interpreter(test_file: str, at_least: int) -> None:
    """Run ``test_file`` under the interpreter and check that none of it failed and at least
    ``at_least`` of its tests passed (so a skip cannot pass for a run)."""
    out = run_under_interpreter(test_file)
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= at_least and " failed" not in out, out[-2000:]


def _interpreter_takes_loaded_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a 1-element array, which NumPy >= 2.4
    refuses to convert with int(): every kernel loop bounded by a loaded length (the decode and
    prefill kernels' context loops) then fails under TRITON_INTERPRET=1. Convert it as a 0-d
    array instead (interpreter runs only; compiled kernels are unaffected)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patched


if INTERPRETING:
    _interpreter_takes_loaded_loop_bounds()
