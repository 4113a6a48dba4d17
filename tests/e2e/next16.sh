#!/usr/bin/env bash
# The end-to-end test on Next 16: a scratch copy of examples/nextjs with next@16.4.6 (the pinned
# app stays on 15.5.28), installed fresh, then `cargo test --test e2e -- --ignored` against it.
#   bash tests/e2e/next16.sh            (NEXT16_DIR=… to keep the copy elsewhere)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${NEXT16_DIR:-$root/target/next16}
rm -rf "$dir" && mkdir -p "$dir"
(cd "$root/examples/nextjs" && tar --exclude=node_modules --exclude=.next -cf - .) | (cd "$dir" && tar -xf -)
cd "$dir"
rm -f package-lock.json
sed -i 's/"next": "15.5.28"/"next": "16.4.6"/' package.json
# @isrgate/next from this repository, wherever the copy lives.
sed -i "s#\"file:../../packages/next\"#\"file:$root/packages/next\"#" package.json
npm install --no-audit --no-fund
cd "$root"
NEXT_DIR="$dir" cargo test --test e2e --locked -- --ignored
