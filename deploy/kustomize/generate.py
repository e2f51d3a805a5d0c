"""Write the Kustomize base, its monitoring component and the plain Prometheus rule file
from the Helm chart's defaults.

    python deploy/kustomize/generate.py          # or: make kustomize-base

The files are generated, never edited by hand: a test renders them again and compares, so
the chart and the plain manifests cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "helm" / "render"))

import helm_template  # noqa: E402

VALUES = ROOT / "helm" / "ultrakv" / "ci" / "kustomize-values.yaml"
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
HEADER = ("# Generated from helm/ultrakv with ci/kustomize-values.yaml by `make kustomize-base`;"
          " do not edit.\n")


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop what only Helm means (chart label, resource policy) from one object."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            labels = node.get("labels")
            if isinstance(labels, dict):
                labels.pop("helm.sh/chart", None)
                if "app.kubernetes.io/managed-by" in labels:
                    labels["app.kubernetes.io/managed-by"] = "kustomize"
            annotations = node.get("annotations")
            if isinstance(annotations, dict):
                annotations.pop("helm.sh/resource-policy", None)
                if not annotations:
                    node.pop("annotations")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return obj


def generate() -> dict[Path, str]:
    """The generated files by path (nothing written)."""
    values = helm_template.load_values([VALUES])
    objects = helm_template.render_objects(values, api_versions=("monitoring.coreos.com/v1",))
    base = [_plain(o) for o in objects if o["kind"] not in MONITORING_KINDS]
    monitoring = [_plain(o) for o in objects if o["kind"] in MONITORING_KINDS]

    def dump(objs: list[dict[str, Any]]) -> str:
        return HEADER + "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objs)

    def kustomization(resource: str, kind: str, extra: str = "") -> str:
        api = "v1alpha1" if kind == "Component" else "v1beta1"
        return (HEADER + f"apiVersion: kustomize.config.k8s.io/{api}\n"
                f"kind: {kind}\n{extra}resources:\n  - {resource}\n")

    (rule,) = [o for o in monitoring if o["kind"] == "PrometheusRule"]
    rules = ("# Prometheus rule file (rule_files:) for installs without the Prometheus operator.\n"
             + HEADER + yaml.safe_dump(rule["spec"], sort_keys=False))
    return {
        ROOT / "deploy" / "prometheus" / "ultrakv-rules.yaml": rules,
        HERE / "base" / "ultrakv.yaml": dump(base),
        HERE / "base" / "kustomization.yaml": kustomization("ultrakv.yaml", "Kustomization"),
        HERE / "monitoring" / "monitoring.yaml": dump(monitoring),
        HERE / "monitoring" / "kustomization.yaml": kustomization(
            "monitoring.yaml", "Component",
            "# Needs the Prometheus operator CRDs; add under `components:` of an overlay.\n"),
    }


def main() -> int:
    for path, text in generate().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
