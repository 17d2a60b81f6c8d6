#!/usr/bin/env bash
# The Docker engine `make docker-test` starts when none runs: ../shared/tools/docker-engine, with the
# overlay2 storage driver wherever this kernel lets us mount overlayfs.
#
#   eval "$(docker/engine.sh start)"   # prints `export DOCKER_HOST=...`, as the shared tool does
#   $DOCKER_ENGINE stop                 # the shared tool stops it (same pid file)
#
# Why: the shared tool starts dockerd with vfs, where every layer and every container is a full copy
# of the image (about 1.3 GB; a container costs two, its init layer and its own). The compose stack's
# 13 containers plus the build then take about 40 GB of disk, and a CI run on a fuller disk failed
# with "no space left on device". overlay2 shares the image's files between containers instead.
# dockerd is started here on the shared tool's socket and pid file; its `start` then finds an engine
# running, builds its stand-in base image into that one and prints DOCKER_HOST, and its `stop` stops
# it. Where overlayfs cannot be mounted, the shared tool starts its vfs engine as before.
set -euo pipefail
ENGINE=${DOCKER_ENGINE:-$(cd "$(dirname "$0")/../.." && pwd)/shared/tools/docker-engine}
ROOT=${FACEFED_DOCKER_ROOT:-${TMPDIR:-/tmp}/facefed-docker}
SOCK=$ROOT/docker.sock

# Can we mount overlayfs on the file system that holds the data root? (No mount, no overlay2.)
overlay_mounts() {
  local probe rc=1
  probe=$(mktemp -d "$ROOT/overlay-probe.XXXX")
  mkdir "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
  if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
    "$probe/merged" 2>/dev/null; then
    umount "$probe/merged" && rc=0
  fi
  rm -rf "$probe"
  return $rc
}

start() {
  [ -x "$ENGINE" ] || { echo "no $ENGINE; set DOCKER_ENGINE to ../shared/tools/docker-engine" >&2; exit 2; }
  mkdir -p "$ROOT"
  if ! docker -H "unix://$SOCK" info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1 \
      || ! command -v debootstrap >/dev/null 2>&1; then
      # what the shared tool would install (it does so only when it starts dockerd itself)
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
    fi
    if overlay_mounts; then
      echo "docker engine: overlay2 storage in $ROOT/data" >&2
      nohup dockerd --storage-driver=overlay2 --iptables=false --data-root "$ROOT/data" \
        --exec-root "$ROOT/exec" -H "unix://$SOCK" --pidfile "$ROOT/dockerd.pid" >"$ROOT/dockerd.log" 2>&1 &
      for _ in $(seq 60); do docker -H "unix://$SOCK" info >/dev/null 2>&1 && break; sleep 1; done
      if ! docker -H "unix://$SOCK" info >/dev/null 2>&1; then
        # leave it to the shared tool's vfs engine
        echo "docker engine: overlay2 did not start (see $ROOT/dockerd.log); falling back to vfs" >&2
        [ -f "$ROOT/dockerd.pid" ] && kill "$(cat "$ROOT/dockerd.pid")" 2>/dev/null || true
        rm -f "$ROOT/dockerd.pid" "$SOCK"
      fi
    else
      echo "docker engine: overlayfs cannot be mounted here; vfs storage (about 40 GB of disk)" >&2
    fi
  fi
  exec "$ENGINE" start
}

case "${1:-}" in
  start) start ;;
  *) echo "usage: docker/engine.sh start" >&2; exit 2 ;;
esac
