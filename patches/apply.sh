#!/usr/bin/env bash
# Materialises the patched crates this project builds with (see patches/README.md) under
# patches/.build/ (gitignored), from the pristine crates.io archives, verified by checksum.
# Idempotent: a crate already patched from the same archive and patch is left alone.
# Run it once after a clone and after changing a patch; `.ci/run` and `benches/run.sh` do.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build="$here/.build"
cargo_home=${CARGO_HOME:-$HOME/.cargo}

# name version sha256 (the checksum Cargo.lock records for the crates.io release)
crates=(
    "zeromq 0.7.0 55b31ad37d1aad854ddc8c4f16b637259ce95f757f6c32f05447279c68ed9e2a"
)

# The pristine .crate from cargo's own cache; fetched through cargo (a throwaway manifest
# depending on exactly that version) when the cache does not have it.
pristine() {
    local name=$1 version=$2 found
    found=$(ls "$cargo_home"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -n 1 || true)
    if [[ -z "$found" ]]; then
        local tmp
        tmp=$(mktemp -d)
        mkdir -p "$tmp/src"
        printf '[package]\nname = "fetch-pristine"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n%s = "=%s"\n\n[workspace]\n' \
            "$name" "$version" >"$tmp/Cargo.toml"
        : >"$tmp/src/lib.rs"
        cargo fetch --quiet --manifest-path "$tmp/Cargo.toml" >&2
        rm -rf "$tmp"
        found=$(ls "$cargo_home"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -n 1 || true)
    fi
    [[ -n "$found" ]] || { echo "patches/apply.sh: cannot obtain $name-$version.crate" >&2; exit 1; }
    echo "$found"
}

mkdir -p "$build"
for entry in "${crates[@]}"; do
    read -r name version sum <<<"$entry"
    dest="$build/$name-$version"
    patches=("$here/$name-$version"-*.patch)
    stamp=$(cat "${patches[@]}" | sha256sum | cut -d' ' -f1)
    stamp="$sum $stamp"
    if [[ -f "$dest/.kernelbox-patched" && "$(cat "$dest/.kernelbox-patched")" == "$stamp" ]]; then
        continue
    fi
    archive=$(pristine "$name" "$version")
    actual=$(sha256sum "$archive" | cut -d' ' -f1)
    if [[ "$actual" != "$sum" ]]; then
        echo "patches/apply.sh: $archive has sha256 $actual, expected $sum" >&2
        exit 1
    fi
    tmp=$(mktemp -d "$build/.tmp.XXXXXX")
    tar -xzf "$archive" -C "$tmp"
    for p in "${patches[@]}"; do
        patch --quiet --forward -p1 -d "$tmp/$name-$version" <"$p"
    done
    echo "$stamp" >"$tmp/$name-$version/.kernelbox-patched"
    rm -rf "$dest"
    mv "$tmp/$name-$version" "$dest"
    rm -rf "$tmp"
    echo "patches/apply.sh: $name $version patched into ${dest#"$PWD"/}" >&2
done
