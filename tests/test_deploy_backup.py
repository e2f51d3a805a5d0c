"""The chart's scheduled backups (helm/ultrakv/templates/backup-cronjob.yaml): a CronJob that
runs `ultrakv backup create --keep N` against the coordinator Service into a volume, valid
for Kubernetes (helm/ultrakv/ci/backup-values.yaml also runs through the chart's schema and
Kubernetes validation in test_deploy_chart.py)."""

from __future__ import annotations

import pytest
from chart_render import CHART, find, helm_template, render, renderer_or_skip
from ultrakv.client.cli import build_parser

KUBE_VERSIONS = ("1.28.0", "1.34.0")


@pytest.fixture(scope="module", autouse=True)
def _renderer() -> None:
    renderer_or_skip()


def _job_pod(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_backups_are_off_by_default() -> None:
    assert not [o for o in render() if o["kind"] == "CronJob"]


def test_the_cronjob_runs_backup_create_with_retention_into_a_volume() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render(files=(CHART / "ci" / "backup-values.yaml",))
    cron = find(objects, "CronJob", "backup")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(cron, version, strict=True)
    spec = cron["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("30 */6 * * *", "Etc/UTC")
    assert spec["concurrencyPolicy"] == "Forbid"  # never two backups at once
    pod = _job_pod(cron)
    c = pod["containers"][0]
    assert c["args"][:2] == ["backup", "create"]
    assert {"--address=ultrakv:50051", "--output=/backups", "--compress=zstd", "--keep=8",
            "--tls-ca=/etc/ultrakv/tls/ca.crt", "--tls-cert=/etc/ultrakv/tls/tls.crt"} <= set(c["args"])
    # The CLI accepts exactly what the chart passes (ULTRAKV_API_KEY carries the key).
    args = build_parser().parse_args(c["args"])
    assert (args.keep, args.compress, args.output) == (8, "zstd", "/backups")
    assert {"name": "ULTRAKV_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "ultrakv-backup-key", "key": "api-key"}}} in c["env"]
    claim = find(objects, "PersistentVolumeClaim", "backups")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["backups"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["backups"] == "/backups"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_an_existing_claim_and_history_only() -> None:
    objects = render({"backup": {"enabled": True, "historyOnly": True, "compress": "none",
                                 "persistence": {"existingClaim": "nfs-backups"}}})
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"
                and o["metadata"]["name"].endswith("backups")]
    pod = _job_pod(find(objects, "CronJob", "backup"))
    assert "--history-only" in pod["containers"][0]["args"]
    assert "env" not in pod["containers"][0]  # no keys file: the open edge needs no key
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "nfs-backups"


def test_api_keys_without_a_backup_key_are_refused() -> None:
    with pytest.raises(RuntimeError, match="backup.apiKeySecret"):
        render({"backup": {"enabled": True}, "auth": {"keysSecret": "ultrakv-keys"}})


@pytest.mark.parametrize(("overrides", "path"), [
    ({"backup": {"keep": 0}}, "backup.keep"),
    ({"backup": {"compress": "gzip"}}, "backup.compress"),
    ({"backup": {"schedule": "hourly"}}, "backup.schedule"),
    ({"backup": {"kepp": 3}}, "backup"),
])
def test_schema_rejects_bad_backup_values(overrides: dict, path: str) -> None:
    with pytest.raises(helm_template.ValuesError) as err:
        helm_template.load_values(overrides=overrides)
    assert f"- {path}:" in str(err.value)
