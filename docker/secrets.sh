#!/bin/sh
# Make the certificates and keys for docker/compose.yml, one folder per service, on THIS host.
#
#   docker/secrets.sh [OUT]      (default: docker/secrets; compose reads FACEFED_SECRETS, same default)
#
# Needs only Docker and the image (FACEFED_IMAGE, default facefed:$FACEFED_TAG, tag default dev): the
# CLI runs in a throwaway container with no network, as root, so that it can hand each service's
# folder to uid 10001 (the images' user) with 0600 keys; nothing is kept in any container.
# Re-running it keeps what exists (the CAs, node keys) and refreshes the per-service copies.
# Layout (see the header of docker/compose.yml for who mounts what):
#   OUT/offline/federation/   facefed-server certs --host server   (ca.key: mounted nowhere)
#   OUT/offline/<site>-stores/ facefed-client store certs --hosts <site>-holder1,..   (ca.key: mounted nowhere)
#   OUT/server/{tls,sites}/  OUT/<site>/{federation (ca.crt, receipts.pub),node,store-tls}/  OUT/<site>-holder<i>/
# SITES (default "north south east") and HOLDERS (default 3) must match compose.yml.
set -eu
OUT=${1:-${FACEFED_SECRETS:-$(dirname "$0")/secrets}}
IMAGE=${FACEFED_IMAGE:-facefed:${FACEFED_TAG:-dev}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

docker run --rm --network none --user 0:0 --entrypoint sh \
  -e SITES="${SITES:-north south east}" -e HOLDERS="${HOLDERS:-3}" -e SERVER_HOST="${SERVER_HOST:-server}" \
  -v "$OUT:/secrets" "$IMAGE" -c '
set -eu
umask 077
cd /secrets
copy() { dest=$1; shift; mkdir -p "$dest"; for f in "$@"; do cp "$f" "$dest/"; done; }
mkdir -p offline
if [ ! -f offline/federation/ca.crt ]; then
  facefed-server certs --out offline/federation --host "$SERVER_HOST" >/dev/null
fi
F=offline/federation
copy server/tls $F/ca.crt $F/server.crt $F/server.key $F/receipts.key $F/receipts.pub
mkdir -p server/sites
for site in $SITES; do
  [ -f "$site/node/node.key" ] || facefed-client keygen --out "$site/node" >/dev/null
  cp "$site/node/node.pub" "server/sites/$site.pub"
  copy "$site/federation" $F/ca.crt $F/receipts.pub
  hosts=""
  i=1; while [ "$i" -le "$HOLDERS" ]; do hosts="$hosts${hosts:+,}$site-holder$i"; i=$((i + 1)); done
  S=offline/$site-stores
  [ -f "$S/client.pem" ] || facefed-client store certs --out "$S" --hosts "$hosts" >/dev/null
  copy "$site/store-tls" $S/ca.pem $S/client.pem $S/client.key
  i=1; while [ "$i" -le "$HOLDERS" ]; do
    h=$site-holder$i
    copy "$h" $S/holders/$h/ca.pem $S/holders/$h/server.pem $S/holders/$h/server.key
    chown -R 10001:10001 "$h"; i=$((i + 1))
  done
  chown -R 10001:10001 "$site"
done
chown -R 10001:10001 server
chown -R 0:0 offline; chmod -R go-rwx offline
find . -type d -exec chmod 0700 {} +
echo "secrets in $(pwd) for the server, $(echo $SITES | wc -w) sites and $HOLDERS holders each; CA keys in offline/ (mount nowhere)"
'
