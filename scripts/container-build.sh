#!/usr/bin/env bash
# Build the vwe image with podman from a Debian base made by debootstrap: what the tests build and run
# (tests/test_container_build.py) on machines with no Docker engine and no image registry, only Debian's.
#   scripts/container-build.sh [IMAGE]          (default localhost/vwe:dev; prints IMAGE when done)
# As root; needs podman, runc, debootstrap. Steps:
#   1. a containers.conf for these machines ($CACHE/containers.conf: runc, cgroupfs, no default ulimits),
#      used unless CONTAINERS_CONF is set;
#   2. the base image localhost/vwe-base:<suite>-<key>: imported from $CACHE/base-<suite>-<key>.tar, which
#      debootstrap makes when it is missing (minbase + python3, pip, venv; key: suite, mirror, packages);
#   3. podman build of docker/Dockerfile with --build-arg BASE_IMAGE=<that base>. The host's pip
#      configuration (its config files and PIP_* variables, merged by `pip config list`) goes in as a
#      pip.conf (--build-arg PIP_CONFIG_FILE), with the local folders and files it names (find-links,
#      file:// indexes, constraints, certificates) bind-mounted read-only at the same paths.
#      pip's download/wheel cache is the Dockerfile's cache mount, kept under $CACHE/tmp.
# Environment: VWE_CONTAINER_CACHE (default /var/cache/vwe-container), VWE_DEBIAN_SUITE (bookworm),
#   VWE_DEBIAN_MIRROR (default: the first Debian URI of the machine's apt sources, else deb.debian.org),
#   PYTHON (the host Python whose pip configuration is used; python3).
set -euo pipefail

image="${1:-localhost/vwe:dev}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${VWE_CONTAINER_CACHE:-/var/cache/vwe-container}"
suite="${VWE_DEBIAN_SUITE:-bookworm}"
python="${PYTHON:-python3}"
packages="python3,python3-venv,python3-pip"
mkdir -p "$cache/tmp"

log() { echo "container-build [${SECONDS}s]: $*" >&2; }
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (apt-get install podman runc debootstrap)"; exit 2; }
done

# crun fails on these machines' cgroup setup ("cgroups in hybrid mode"), and the default ulimits cannot be
# set from inside their sandbox: podman uses this file unless CONTAINERS_CONF names another (the tests
# point `podman run` at it too).
cat >"$cache/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
export CONTAINERS_CONF="${CONTAINERS_CONF:-$cache/containers.conf}"

# --- 2. the Debian base
mirror="${VWE_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v '^[[:space:]]*#' \
        | grep -Eo '(https?|file)://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
fi
key="$(printf '%s\n' "$suite" "$mirror" "$packages" | sha256sum | cut -c1-12)"
base="localhost/vwe-base:$suite-$key"
tarball="$cache/base-$suite-$key.tar"
if podman image exists "$base"; then
    log "base $base: present"
else
    if [ ! -s "$tarball" ]; then
        log "base: debootstrap $suite from $mirror into $tarball"
        rootfs="$(mktemp -d "$cache/rootfs.XXXXXX")"
        trap 'rm -rf "$rootfs" "$tarball.part"' EXIT
        debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
            || { tail -n 30 "$cache/debootstrap.log" >&2; log "debootstrap failed (log: $cache/debootstrap.log)"; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$rootfs"
        trap - EXIT
    fi
    log "base: podman import $tarball as $base"
    podman import --quiet "$tarball" "$base" >/dev/null
fi

# --- 3a. the host's pip configuration, and the local paths it names
conf="$(mktemp "$cache/tmp/pip.conf.XXXXXX")"
trap 'rm -f "$conf"' EXIT
chmod 0644 "$conf"
mapfile -t mounts < <("$python" - "$conf" <<'PY'
import os, re, subprocess, sys
from urllib.parse import unquote, urlparse

out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
sections, env = {}, {}
for line in out.splitlines():  # e.g. global.find-links='/opt/wheels', :env:.cert='/etc/ssl/...'
    m = re.match(r"^([^.]*)\.([^=]+)='(.*)'$", line)
    if m:
        section, name, value = m.groups()
        (env if section == ":env:" else sections.setdefault(section, {}))[name] = value
for name, value in env.items():  # PIP_* variables override every file's setting
    for values in sections.values():
        values.pop(name, None)
    sections.setdefault("global", {})[name] = value
paths = set()
for values in sections.values():
    for name, value in values.items():
        if name in ("find-links", "index-url", "extra-index-url", "constraint", "requirement", "cert",
                    "client-cert"):
            for item in value.split():
                path = unquote(urlparse(item).path) if item.startswith("file:") else item
                if not os.path.isabs(path) or not os.path.exists(path):
                    continue
                # a file:// simple index links its files relatively (../../files/x.whl): mount its parent
                if name.endswith("index-url"):
                    path = os.path.dirname(path.rstrip("/"))
                paths.add(os.path.realpath(path) + ":" + path)
with open(sys.argv[1], "w") as f:
    for section, values in sections.items():
        f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
print("\n".join(sorted(paths)))
PY
)
volumes=()
for m in "${mounts[@]}"; do
    [ -n "$m" ] && volumes+=(--volume "$m:ro")
done
log "pip configuration for the build: $(tr '\n' ' ' <"$conf" | sed -E 's#//[^/@ ]+@#//***@#g')"

# --- 3b. the image
log "podman build $image from $base"
previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
# TMPDIR: where buildah keeps the Dockerfile's cache mounts (pip's downloads and built wheels).
TMPDIR="$cache/tmp" podman build --network host --layers \
    --build-arg BASE_IMAGE="$base" \
    --build-arg PIP_CONFIG_FILE=/run/vwe-pip.conf --volume "$conf:/run/vwe-pip.conf:ro" "${volumes[@]}" \
    -f "$repo/docker/Dockerfile" -t "$image" "$repo" >&2
# The image this one replaces (and its layers that nothing else uses): ~7 GB each.
current="$(podman image inspect --format '{{.Id}}' "$image")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || log "could not remove the previous $image ($previous)"
fi
log "built $image"
echo "$image"
