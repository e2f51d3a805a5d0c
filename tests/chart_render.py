"""Test helpers for the Helm chart: render it with the Go renderer (built once, cached under
build/helm-render), pick objects and containers out of the result."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "ultrakv"
sys.path.insert(0, str(ROOT / "helm" / "render"))

import helm_template  # noqa: E402

MONITORING_API = "monitoring.coreos.com/v1"


def renderer_or_skip() -> None:
    """Build the renderer, or skip where Go or sprig cannot be installed (CI installs both)."""
    try:
        helm_template.build_renderer()
    except helm_template.RendererUnavailable as exc:
        if shutil.which("apt-get"):  # installable here: a missing package is a setup bug
            pytest.fail(f"{exc}; `bash .ci/install-deploy-tools.sh` installs it (make install and .ci/run do)")
        pytest.skip(f"chart renderer unavailable: {exc}")


def render(overrides: dict[str, Any] | None = None, files: tuple[Path, ...] = (),
           **kwargs: Any) -> list[dict[str, Any]]:
    """The chart's objects for its defaults, ``files`` and ``overrides``."""
    kwargs.setdefault("api_versions", (MONITORING_API,))
    return helm_template.render_objects(helm_template.load_values(list(files), overrides),
                                        **kwargs)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (whose name ends with ``name``, when given)."""
    hits = [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"].endswith(name))]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
