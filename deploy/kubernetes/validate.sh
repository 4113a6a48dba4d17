#!/usr/bin/env bash
# Validates deploy/kubernetes offline, in seconds:
# 1. every manifest against the Kubernetes OpenAPI schemas, strictly (an unknown or misspelt
#    field fails), for the oldest Kubernetes these manifests support and the newest the
#    validator knows: the `kubernetes-validate` package ships the schemas, so no cluster and no
#    network are needed once it is installed (into a venv under target/, made on first run);
# 2. the ServiceMonitor (a CRD, which kubernetes-validate has no schema for) against
#    schemas/servicemonitor-v1.json;
# 3. what no schema sees (consistency.py): selectors that select, port names that exist,
#    Secret keys that are there, config keys that isrgate knows, and the shutdown arithmetic
#    (preStop + accept_grace + shutdown_grace within terminationGracePeriodSeconds).
# The ConfigMap's isrgate.toml is also loaded by isrgate's own validation in the tests
# (tests/it/lifecycle.rs).
#
#   bash deploy/kubernetes/validate.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/kubernetes-validate"
# Pinned: the schemas it ships are what the manifests are checked against.
package="kubernetes-validate==1.37.0"
# The oldest Kubernetes the manifests are written for (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is on by default from 1.27).
oldest=1.27.0

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "==> installing python3-venv"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends python3 python3-venv
fi
if ! "$venv/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
    echo "==> installing $package into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$package"
fi
# consistency.py reads TOML: the standard library's tomllib from Python 3.11, else tomli.
if ! "$venv/bin/python" -c 'import tomllib' >/dev/null 2>&1 \
    && ! "$venv/bin/python" -c 'import tomli' >/dev/null 2>&1; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check tomli
fi

cd "$here"
# Everything but the kustomization (kustomize's own file) and the CRD (step 2).
manifests=()
for f in *.yaml; do
    case "$f" in
        kustomization.yaml | servicemonitor.yaml) ;;
        *) manifests+=("$f") ;;
    esac
done
for version in "$oldest" latest; do
    flag=()
    [ "$version" = latest ] || flag=(--kubernetes-version "$version")
    "$venv/bin/kubernetes-validate" --strict --quiet "${flag[@]}" "${manifests[@]}"
done
"$venv/bin/python" consistency.py "$root"
echo "deploy/kubernetes: ${#manifests[@]} manifests valid (Kubernetes $oldest and latest), ServiceMonitor valid, consistent"
