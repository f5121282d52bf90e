#!/usr/bin/env bash
# Serves the built demo page (demo/, after demo/build.sh) on http://127.0.0.1:$PORT/ (default 8000).
set -euo pipefail

demo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$demo/pkg/blockflash_demo.js" ]]; then
  echo "serve.sh: $demo/pkg is missing; build it first with demo/build.sh" >&2
  exit 1
fi
port="${PORT:-8000}"
echo "serving the blockflash demo on http://127.0.0.1:$port/ (Ctrl-C stops)"
exec python3 -m http.server "$port" --bind 127.0.0.1 --directory "$demo"
