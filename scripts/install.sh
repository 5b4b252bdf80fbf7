#!/usr/bin/env bash
# Installs Kensa under a prefix, self-contained, for a system user and the systemd unit:
#   PREFIX/bin/kensa                  the binary (its rpath finds PREFIX/lib/torch/lib first)
#   PREFIX/lib/torch/lib, lib/nvidia  the libtorch (and, for the CUDA wheel, CUDA) libraries it
#                                     links, in the wheel's own layout so their rpaths still hold
#   PREFIX/share/kensa/models         the default backbone (efficientnet-lite0.pt)
#   PREFIX/share/kensa/pipelines      the GStreamer pipeline templates
#   PREFIX/share/kensa/kensa.service  the systemd unit with this prefix filled in
#   PREFIX/share/kensa/kensa.example.toml
#
#   scripts/install.sh --prefix /opt/kensa            # builds first (scripts/setup.sh) if needed
#   scripts/install.sh --prefix DIR --link            # hard links instead of copies (same file
#                                                     # system only; for tests and staging)
# The binary must have been built by this checkout (scripts/setup.sh); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=""
mode=copy
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a folder}"; shift 2 ;;
    --link) mode=link; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix DIR is required" >&2; exit 2; }
source scripts/env.sh
bin="${KENSA_BIN:-$CARGO_TARGET_DIR/release/kensa}"
if [ ! -x "$bin" ]; then
  scripts/setup.sh
fi
[ -x "$bin" ] || { echo "install.sh: no built binary at $bin" >&2; exit 1; }
site="$(cd "$KENSA_TORCH_LIB/../.." && pwd)"   # the venv's site-packages
put() { # put SRC DEST: copy (or hard link), following symlinks
  mkdir -p "$(dirname "$2")"
  if [ "$mode" = link ]; then ln -f "$(readlink -f "$1")" "$2"; else cp -fL "$1" "$2"; fi
}
mkdir -p "$prefix/bin" "$prefix/lib" "$prefix/share/kensa/models"
put "$bin" "$prefix/bin/kensa"
# Every folder of the venv that holds a library the binary links (torch/lib, nvidia/*/lib)
# goes whole: libraries there dlopen their siblings (cuDNN's engines, nvrtc builtins).
dirs=$(ldd "$bin" | awk '/=> \// { print $3 }' | while read -r l; do
  case "$l" in "$site"/*) dirname "$(realpath -s --relative-to="$site" "$l")" ;; esac
done | sort -u)
[ -n "$dirs" ] || { echo "install.sh: $bin links no library from $site (built without scripts/env.sh?)" >&2; exit 1; }
n=0
for d in $dirs; do
  for f in "$site/$d"/*.so*; do
    [ -e "$f" ] || continue
    put "$f" "$prefix/lib/$d/$(basename "$f")"
    n=$((n + 1))
  done
done
backbone="${KENSA_BACKBONE:-$KENSA_CACHE/models/efficientnet-lite0.pt}"
if [ -f "$backbone" ]; then
  put "$backbone" "$prefix/share/kensa/models/efficientnet-lite0.pt"
  [ -f "$backbone.json" ] && put "$backbone.json" "$prefix/share/kensa/models/efficientnet-lite0.pt.json"
fi
rm -rf "$prefix/share/kensa/pipelines"
cp -r pipelines "$prefix/share/kensa/pipelines"
# The example for /etc/kensa/kensa.toml: the unit's file system is read-only but for its
# StateDirectory, /var/lib/kensa, so the outbox and the banks (learning writes versions beside
# them) go there, not beside the config (relative paths resolve against the config's folder).
sed -e 's#^dir = "kensa-outbox"#dir = "/var/lib/kensa/outbox"#' \
    -e 's#^bank = "banks/#bank = "/var/lib/kensa/banks/#' \
    config/kensa.example.toml > "$prefix/share/kensa/kensa.example.toml"
grep -q '^dir = "/var/lib/kensa/outbox"' "$prefix/share/kensa/kensa.example.toml" \
  || { echo "install.sh: config/kensa.example.toml has no outbox dir to place under /var/lib/kensa" >&2; exit 1; }
# Every /opt/kensa/ path of the unit (ExecStart, KENSA_BACKBONE) moves to the prefix.
sed -e "s#/opt/kensa/#${prefix%/}/#g" deploy/systemd/kensa.service > "$prefix/share/kensa/kensa.service"
chmod -R a+rX "$prefix"
echo "installed kensa $("$prefix/bin/kensa" --version | awk '{print $2}') into $prefix ($n libraries from $(echo $dirs | wc -w) folders, $mode)"
echo "next: useradd --system kensa; install -Dm644 $prefix/share/kensa/kensa.example.toml /etc/kensa/kensa.toml and edit it"
echo "      (keep [outbox] dir = \"/var/lib/kensa/outbox\", and publish.store_dir and banks under /var/lib/kensa:"
echo "      the unit can write nowhere else); cp $prefix/share/kensa/kensa.service /etc/systemd/system/; systemctl enable --now kensa"
