#!/usr/bin/env bash
# Renders the kustomize overlays and validates every object offline (validate.py says how). Needs a
# kubectl with kustomize 5 (Debian's kubernetes-client bundles an older one: without a suitable kubectl
# it says so and skips). Installs `kubernetes-validate` from PyPI into a venv and three @kubernetes-models
# packages from npm, cached under $LLAVA_K8S_TOOLS.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools=${LLAVA_K8S_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-server-k8s-validate}
mkdir -p "$tools"
kustomize_major=$( (kubectl version --client 2>/dev/null || true) | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
if [[ -z $kustomize_major || $kustomize_major -lt 5 ]]; then
  echo "deploy/kubernetes/test.sh: skipped: no kubectl with kustomize >= 5 on PATH" >&2
  exit 0
fi
if [[ ! -x $tools/venv/bin/python ]] || ! "$tools/venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
if [[ ! -d $tools/npm/node_modules/@kubernetes-models/keda ]]; then
  mkdir -p "$tools/npm"
  (cd "$tools/npm" && echo '{"private":true}' > package.json &&
    npm install --silent --no-audit --no-fund --no-save \
      "@kubernetes-models/prometheus-operator@6.0.0" "@kubernetes-models/gateway-api@2.0.0" \
      "@kubernetes-models/keda@2.0.0" >/dev/null 2>&1)
fi
"$tools/venv/bin/python" "$here/validate.py" kubectl "$tools/npm"
