#!/usr/bin/env bash
# Regenerates the demo's sample certificate chain: an ARK -> ASK -> VCEK chain with the key
# types and signature algorithms AMD uses (RSA-4096 RSASSA-PSS/SHA-384 for ARK and ASK, a
# P-384 VCEK key). Every subject says SAMPLE / NOT AMD: these certificates attest nothing.
# The private keys are thrown away.
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)/sample
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
pss=(-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:48 -sha384)
subj() { echo "/O=coco-sidecar SAMPLE - NOT AMD/OU=Engineering/CN=$1 (SAMPLE, NOT AMD)"; }
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out ark.key 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out ask.key 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out vcek.key 2>/dev/null
cat > ca.ext <<'X'
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
X
echo "keyUsage=critical,digitalSignature" > leaf.ext
openssl req -new -x509 -key ark.key -subj "$(subj ARK-Sample)" -days 9125 "${pss[@]}" \
  -set_serial 1 -outform DER -out ark.der -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign
openssl req -new -key ask.key -subj "$(subj SEV-Sample)" -out ask.csr
openssl x509 -req -in ask.csr -CA ark.der -CAform DER -CAkey ark.key -set_serial 2 -days 9125 \
  "${pss[@]}" -extfile ca.ext -outform DER -out ask.der 2>/dev/null
openssl req -new -key vcek.key -subj "$(subj SEV-VCEK-Sample)" -out vcek.csr
openssl x509 -req -in vcek.csr -CA ask.der -CAform DER -CAkey ask.key -set_serial 3 -days 9125 \
  "${pss[@]}" -extfile leaf.ext -outform DER -out vcek.der 2>/dev/null
cp ark.der ask.der vcek.der "$out/"
ls -l "$out"
