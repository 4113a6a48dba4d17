#!/usr/bin/env bash
# The end-to-end tests on another Next.js version: a scratch copy of examples/nextjs (the pinned
# app stays on 15.5.28) with next@VERSION and react@REACT installed fresh, then
# `cargo test --test e2e -- --ignored [FILTER]` against it.
#   bash tests/e2e/next_version.sh 16.4.6 19.2.9
#   bash tests/e2e/next_version.sh 14.2.35 18.3.1 app_revalidation
# NEXT_COPY_DIR=… keeps the copy elsewhere (default target/next-VERSION).
set -euo pipefail
version=${1:?next version}
react=${2:?react version}
filter=${3:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${NEXT_COPY_DIR:-$root/target/next-$version}
rm -rf "$dir" && mkdir -p "$dir"
(cd "$root/examples/nextjs" && tar --exclude=node_modules --exclude=.next -cf - .) | (cd "$dir" && tar -xf -)
cd "$dir"
rm -f package-lock.json
sed -i "s/\"next\": \"15.5.28\"/\"next\": \"$version\"/; s/\"react\": \"19.2.9\"/\"react\": \"$react\"/; s/\"react-dom\": \"19.2.9\"/\"react-dom\": \"$react\"/" package.json
# @isrgate/next from this repository, wherever the copy lives.
sed -i "s#\"file:../../packages/next\"#\"file:$root/packages/next\"#" package.json
npm install --no-audit --no-fund
cd "$root"
NEXT_DIR="$dir" cargo test --test e2e --locked -- --ignored $filter
