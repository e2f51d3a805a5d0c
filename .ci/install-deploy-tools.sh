#!/usr/bin/env bash
# The deployment tests' system packages, installed only when missing (reruns cost nothing):
# Go + sprig render the Helm chart (offline, GOPATH mode), kubectl builds the Kustomize base;
# patch applies benchmarks/hop_trace.patch to a scratch copy (tests/test_hop_trace.py).
# Run by .ci/run and `make install`.
set -euo pipefail
missing=()
for pkg in golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev patch; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] || ! command -v kubectl >/dev/null; then
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! command -v kubectl >/dev/null; then  # not packaged in every Debian release
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null \
      || echo "kubectl has no package here: the kustomize build test will skip"
  fi
fi
