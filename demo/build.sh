#!/usr/bin/env bash
# Builds the browser demo: the blockflash-demo crate for wasm32-unknown-unknown, then the
# wasm-bindgen CLI (exactly the wasm-bindgen version in Cargo.lock) into demo/pkg/.
#
# Needs the wasm32-unknown-unknown target (rustup target add wasm32-unknown-unknown) and
# wasm-bindgen-cli (cargo install wasm-bindgen-cli --version <Cargo.lock's wasm-bindgen>).
# Honours CARGO_TARGET_DIR.
set -euo pipefail

demo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$demo")"
cd "$root"

want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
have="$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)"
if [[ "$have" != "$want" ]]; then
  echo "build.sh: need wasm-bindgen-cli $want (Cargo.lock), found '${have:-none}':" >&2
  echo "  cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi

target_dir="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --target wasm32-unknown-unknown -p blockflash-demo
wasm-bindgen --target web --no-typescript --out-dir "$demo/pkg" \
  "$target_dir/wasm32-unknown-unknown/release/blockflash_demo.wasm"
echo "built $demo/pkg ($(du -k "$demo/pkg/blockflash_demo_bg.wasm" | cut -f1) KiB of wasm); serve with demo/serve.sh"
