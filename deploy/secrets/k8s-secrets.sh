#!/bin/sh
# The Secrets that deploy/k8s/components/tls mounts, as YAML, from generate.sh's files (in this
# directory, or in DIR if given), for `kubectl apply` once the namespace exists:
#
#   deploy/secrets/k8s-secrets.sh [DIR] | kubectl apply -f -      # NAMESPACE=vlm-serve
set -eu

dir=${1:-$(dirname "$0")}
secret() {
    kubectl create secret generic "$@" --namespace "${NAMESPACE:-vlm-serve}" --dry-run=client -o yaml
    echo ---
}
secret vlm-model-tls --type=kubernetes.io/tls --from-file=tls.crt="$dir/model.crt" \
    --from-file=tls.key="$dir/model.key" --from-file=ca.crt="$dir/ca.crt"
secret vlm-preprocessor-tls --type=kubernetes.io/tls --from-file=tls.crt="$dir/preprocessor.crt" \
    --from-file=tls.key="$dir/preprocessor.key" --from-file=ca.crt="$dir/ca.crt"
secret vlm-tokens --from-file=api-token="$dir/api-token" --from-file=model-token="$dir/model-token"
