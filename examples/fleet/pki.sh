#!/usr/bin/env bash
# A throwaway PKI for the fleet example, in ./.fleet (made once; delete the folder to start
# over): a server CA and a certificate for localhost and the compose service names, a client
# CA, and a client certificate for alice. Needs openssl.
set -euo pipefail
cd "$(dirname "$0")"
out=.fleet
[ -f "$out/alice.pem" ] && exit 0
mkdir -p "$out/www"
cd "$out"
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ec server-ca.key
openssl req -x509 -new -key server-ca.key -subj "/CN=Fleet example server CA" -days 30 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
  -out server-ca.pem
ec server.key
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
openssl x509 -req -in server.csr -CA server-ca.pem -CAkey server-ca.key -CAcreateserial -days 30 \
  -extfile <(printf "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,DNS:sidecar-a,DNS:sidecar-b\n") \
  -out server.pem 2>/dev/null

ec client-ca.key
openssl req -x509 -new -key client-ca.key -subj "/CN=Fleet example client CA" -days 30 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
  -out client-ca.pem
ec alice.key
openssl req -new -key alice.key -subj "/CN=Alice Liddell" -out alice.csr
openssl x509 -req -in alice.csr -CA client-ca.pem -CAkey client-ca.key -CAcreateserial -days 30 \
  -extfile <(printf "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n") \
  -out alice.pem 2>/dev/null
rm -f ./*.csr ./*.srl
# Throwaway keys, readable by the container's user (10001) in the compose variant.
chmod a+r ./*.key
echo "hello from the application" > www/index.html
echo "made a throwaway PKI in $(pwd)"
