#!/bin/sh
# facefed-site-init: create this site's vault over its share holders (once), then enrol every person
# in the photo folder who is not in the vault yet. Runs in the site's init container (compose.yml);
# it uses only the README's CLI, so an operator can run the same steps by hand.
#
#   /photos/<person id>/*.jpg|*.png   read-only: one folder per person (the folder name is the id)
#   FACEFED_VAULT      the vault folder (a volume), default /vault
#   FACEFED_STORES     comma-separated stores, e.g. grpcs://north-holder1:7001,grpcs://north-holder2:7001,...
#   FACEFED_THRESHOLD  k of n (default 2); FACEFED_STORE_TLS: the vault's client bundle (default /store-tls)
#   FACEFED_PHOTOS     the photo folder (default /photos)
#
# Re-running it is safe: people already enrolled are skipped, and so are people who asked to be
# forgotten here (the vault refuses them; re-enrolling needs their new consent: `vault add --allow-reenrol`).
set -eu
VAULT=${FACEFED_VAULT:-/vault}
PHOTOS=${FACEFED_PHOTOS:-/photos}
: "${FACEFED_STORES:?set FACEFED_STORES to the vault's stores (grpcs://host:port,...)}"

if [ ! -f "$VAULT/vault.toml" ]; then
  facefed-client vault init --vault "$VAULT" --stores "$FACEFED_STORES" \
    --threshold "${FACEFED_THRESHOLD:-2}" --tls-dir "${FACEFED_STORE_TLS:-/store-tls}"
fi

enrolled=$(facefed-client vault ls --vault "$VAULT" --json |
  python -c 'import json, sys; print("\n".join(p["person_id"] for p in json.load(sys.stdin)["people"]))')
added=0 skipped=0 failed=0
for dir in "$PHOTOS"/*/; do
  [ -d "$dir" ] || continue
  person=$(basename "$dir")
  if printf '%s\n' "$enrolled" | grep -qxF -- "$person"; then skipped=$((skipped + 1)); continue; fi
  set --
  for f in "$dir"*; do
    case "$f" in *.jpg | *.jpeg | *.png | *.JPG | *.JPEG | *.PNG) [ -f "$f" ] && set -- "$@" "$f" ;; esac
  done
  if [ $# -eq 0 ]; then echo "facefed-site-init: $dir holds no .jpg/.jpeg/.png; skipped" >&2; continue; fi
  if err=$(facefed-client vault add --vault "$VAULT" --person "$person" "$@" 2>&1); then
    added=$((added + 1))
  elif printf '%s' "$err" | grep -q "asked to be forgotten"; then
    echo "facefed-site-init: $person asked to be forgotten at this site; not enrolled again" >&2
    skipped=$((skipped + 1))
  else
    printf '%s\n' "$err" >&2
    failed=$((failed + 1))
  fi
done
echo "facefed-site-init: $added person(s) enrolled, $skipped already there or forgotten, $failed failed"
facefed-client vault ls --vault "$VAULT"
[ "$failed" -eq 0 ]
