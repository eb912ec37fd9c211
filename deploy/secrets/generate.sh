#!/bin/sh
# Creates the TLS and token secrets of compose.tls.yaml (and of the k8s tls component) in this
# directory, or in DIR if given:
#
#   ca.crt, ca.key                  a private CA (ca.key signs the two certificates below)
#   model.crt, model.key            the model service: DNS names model, model-headless, localhost
#   preprocessor.crt, .key          the gateway: DNS names preprocessor, localhost, IP 127.0.0.1
#   api-token                       bearer token of the gateway's clients (gRPC and HTTP)
#   model-token                     bearer token of the gateway → model hop
#
# Both certificates serve as client certificates too (extendedKeyUsage serverAuth, clientAuth):
# the gateway presents its own to the model service (mTLS), as does the model's healthcheck.
# Existing files are kept; delete them to make new ones. None of them is committed (.gitignore).
#
#   deploy/secrets/generate.sh [DIR]      # needs openssl; DAYS=365 by default
set -eu

dir=${1:-$(dirname "$0")}
days=${DAYS:-365}
ns=vlm-serve
mkdir -p "$dir"
cd "$dir"
if [ -e ca.key ]; then
    echo "$(pwd)/ca.key exists: keeping this directory's secrets (delete them to regenerate)" >&2
    exit 0
fi
umask 077

ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

# shellcheck disable=SC2086
openssl req -x509 $ec -keyout ca.key -out ca.crt -days "$days" -subj "/CN=vlm-serve CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

leaf() {  # NAME SUBJECT_ALT_NAMES
    # shellcheck disable=SC2086
    openssl req -new $ec -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.crt"
    rm -f "$1.csr" "$1.ext"
}
leaf model "DNS:model,DNS:model-headless,DNS:model-headless.$ns.svc,DNS:model.$ns.svc,DNS:localhost"
leaf preprocessor "DNS:preprocessor,DNS:preprocessor.$ns.svc,DNS:localhost,IP:127.0.0.1"
rm -f ca.srl

openssl rand -hex 32 | tr -d "\n" > api-token
openssl rand -hex 32 | tr -d "\n" > model-token

# Compose bind-mounts these files as they are, and the services run as uid 10001: the files
# are world-readable, the directory is not (only its owner reaches them on this host).
chmod 700 .
chmod 644 ca.crt model.crt model.key preprocessor.crt preprocessor.key api-token model-token
chmod 600 ca.key
echo "secrets in $(pwd)"
