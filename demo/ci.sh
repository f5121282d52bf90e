#!/usr/bin/env bash
# The browser test from a fresh Debian machine: installs what it needs (Debian's chromium,
# python3 and nodejs/npm where missing; the wasm32 target; wasm-bindgen-cli at Cargo.lock's
# version; playwright-core from package-lock.json), lints and builds the demo, serves it in the
# background, runs demo/tests/browser.mjs, and stops the server. Exits non-zero on any failure.
#
# Environment: PORT (default 8765), CARGO_TARGET_DIR, and the test's own variables
# (see demo/tests/browser.mjs).
set -euo pipefail

demo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$demo")"
cd "$root"
port="${PORT:-8765}"
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - start)); }

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v python3 >/dev/null || missing+=(python3)
command -v npm >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  step "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)"
if [[ "$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }')" != "$want" ]]; then
  step "cargo install wasm-bindgen-cli --version $want"
  timeout 1200 cargo install wasm-bindgen-cli --version "$want"
fi

step "npm ci"
(cd "$demo" && timeout 300 npm ci --no-audit --no-fund)

step "lint for wasm32: the library and the demo (clippy, rustfmt)"
wasm_clippy() { timeout 1200 cargo clippy --release --target wasm32-unknown-unknown "$@" -- -D warnings; }
wasm_clippy -p blockflash --lib # its tests and benches need a native GPU
wasm_clippy -p blockflash-demo --all-targets
cargo fmt -p blockflash-demo --check

step "build"
timeout 1200 "$demo/build.sh"

step "serve on port $port"
PORT="$port" "$demo/serve.sh" >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "ci.sh: the server exited" >&2; exit 1; }
  sleep 0.1
done

step "browser test"
DEMO_URL="http://127.0.0.1:$port/" timeout 600 node "$demo/tests/browser.mjs"
step "done"
