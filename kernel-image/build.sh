#!/usr/bin/env bash
# Builds the kernelbox kernel image without a container registry (debootstrap + pip), idempotently.
#
#   kernel-image/build.sh               prints the image tag; builds it first unless it exists
#   kernel-image/build.sh --print-tag   prints the tag only
#   kernel-image/build.sh --force       rebuilds even if the tag exists
#
# The tag is kernelbox-kernel:<first 12 hex of sha256 over the input files> (kernelbox computes
# the same tag in Rust), so a rebuild happens only when an input changes. Progress goes to stderr,
# the tag alone to stdout. Needs root, Docker, and debootstrap (installed with apt if missing).
# KERNELBOX_DEBIAN_MIRROR overrides the mirror read from the host's apt sources.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The inputs, in hashing order (keep in sync with INPUTS in src/sandbox/docker/image.rs).
inputs=(build.sh setup-rootfs.sh Dockerfile packages.txt requirements.txt kernel-entrypoint.sh
        matplotlibrc ipython_kernel_config.py sitecustomize.py)
suite=bookworm

log() { printf '[kernel-image] %s\n' "$*" >&2; }

image_tag() {
    local f
    for f in "${inputs[@]}"; do
        printf '%s\n' "$f"
        cat "$here/$f"
    done | sha256sum | cut -c1-12 | sed 's/^/kernelbox-kernel:/'
}

# The first bookworm "main" mirror of the host's apt sources (deb822 first, then one-line format).
debian_mirror() {
    if [ -n "${KERNELBOX_DEBIAN_MIRROR:-}" ]; then
        echo "$KERNELBOX_DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(awk -v suite="$suite" '
        function flush() {
            if (uris != "" && enabled != "no" && types ~ /(^| )deb( |$)/ &&
                (" " suites " ") ~ (" " suite " ") && (" " comps " ") ~ / main /) {
                split(uris, u, " "); print u[1]; found = 1; exit
            }
            uris = suites = comps = types = enabled = ""
        }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]*#/ { next }
        { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "") }
        key == "uris" { uris = $0 } key == "suites" { suites = $0 }
        key == "components" { comps = $0 } key == "types" { types = $0 }
        key == "enabled" { enabled = tolower($0) }
        END { if (!found) flush() }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri=$(awk -v suite="$suite" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2; exit }
                                     $1 == "deb" && $0 ~ /\]/ { for (i = 2; i <= NF; i++) if ($i ~ /\]$/) break;
                                       if ($(i + 2) == suite) { print $(i + 1); exit } }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { log "no $suite mirror in /etc/apt/sources.list.d/*.sources; set KERNELBOX_DEBIAN_MIRROR"; exit 1; }
    echo "$uri"
}

force=0
case "${1:-}" in
    --print-tag) image_tag; exit 0 ;;
    --force) force=1 ;;
    "") ;;
    *) log "unknown argument: $1 (use --print-tag or --force)"; exit 2 ;;
esac

tag=$(image_tag)
if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    log "$tag already exists"
    echo "$tag"
    exit 0
fi
[ "$(id -u)" = 0 ] || { log "building the image needs root (debootstrap, chroot)"; exit 1; }

started=$(date +%s)
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
fi
mirror=$(debian_mirror)
packages=$(grep -v '^[[:space:]]*#' "$here/packages.txt" | xargs | tr ' ' ,)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/kernelbox-image.XXXXXX")
root="$work/rootfs"
cleanup() {
    if mountpoint -q "$root/proc" 2>/dev/null; then umount -l "$root/proc" || true; fi
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

log "debootstrap $suite from $mirror with $packages"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
    | sed -u 's/^/[debootstrap] /' >&2
mount -t proc proc "$root/proc"

log "installing the kernel's Python packages (wheels only)"
mkdir -p "$root/tmp/kernelbox-build"
for f in "${inputs[@]}"; do cp "$here/$f" "$root/tmp/kernelbox-build/"; done
cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/kernelbox-build/host-ca.crt"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# A clean environment: the host's PIP_* settings name host paths. The host CA bundle is passed for
# the build only (TLS may go through an intercepting proxy) and deleted with the build dir.
proxy_env=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [ -n "${!v:-}" ]; then proxy_env+=("$v=${!v}"); fi
done
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/tmp/kernelbox-build/host-ca.crt "${proxy_env[@]}" \
    chroot "$root" /bin/sh /tmp/kernelbox-build/setup-rootfs.sh /tmp/kernelbox-build 2>&1 \
    | sed -u 's/^/[setup] /' >&2

umount "$root/proc"
rm -rf "$root/tmp/kernelbox-build" "$root"/tmp/* "$root"/var/tmp/*
: > "$root/etc/resolv.conf"
: > "$root/etc/machine-id" 2>/dev/null || true

# ENV, USER, WORKDIR, ENTRYPOINT and CMD come from the Dockerfile, their single source.
changes=()
while IFS= read -r line; do changes+=(--change "$line"); done \
    < <(grep -E '^(ENV|USER|WORKDIR|ENTRYPOINT|CMD) ' "$here/Dockerfile")
changes+=(--change "LABEL kernelbox.image=$tag")

log "importing $(du -sh --apparent-size "$root" | cut -f1) rootfs as $tag"
tar --numeric-owner -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . \
    | docker import "${changes[@]}" - "$tag" >/dev/null
log "built $tag in $(( $(date +%s) - started )) s"
echo "$tag"
