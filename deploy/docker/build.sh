#!/usr/bin/env bash
# Builds the static `strait` binary and the `strait:dev` image, offline:
# no image is pulled (the Dockerfile is FROM scratch) and no registry is
# needed. Usage: deploy/docker/build.sh [IMAGE-TAG]   (default strait:dev)
#
# The binary is statically linked with glibc; without the getrandom cfg it
# would panic in an empty root file system (no /dev/urandom fallback file).
# It builds into target/static so it does not disturb ordinary builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-strait:dev}"
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_STATIC:-target/static}"

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "build.sh: the Rust target $target is not installed (rustup target add $target)" >&2
  exit 1
fi
RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static --cfg getrandom_backend="linux_getrandom"' \
  cargo build --release --locked --target "$target" --bin strait
bin="$CARGO_TARGET_DIR/$target/release/strait"
if ! file "$bin" | grep -q 'statically linked'; then
  echo "build.sh: $bin is not statically linked:" >&2
  file "$bin" >&2
  exit 1
fi

# `ip` for route capture: a static busybox (Debian busybox-static).
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && file -L "$b" | grep -q 'statically linked'; then busybox="$b"; break; fi
done
if [ -z "$busybox" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
    busybox=/bin/busybox
  else
    echo "build.sh: need a static busybox for \`ip\` in the image (apt-get install busybox-static)" >&2
    exit 1
  fi
fi

ctx="$CARGO_TARGET_DIR/image"
rm -rf "$ctx" && mkdir -p "$ctx"
cp deploy/docker/Dockerfile "$ctx/Dockerfile"
cp "$bin" "$ctx/strait"
cp "$busybox" "$ctx/ip"
strip "$ctx/strait" 2>/dev/null || true
docker build --quiet --tag "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')) from $bin"
