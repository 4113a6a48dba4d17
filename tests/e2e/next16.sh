#!/usr/bin/env bash
# The end-to-end tests on Next 16.4.6 (the pinned app stays on 15.5.28): see next_version.sh.
#   bash tests/e2e/next16.sh            (NEXT_COPY_DIR=… to keep the copy elsewhere)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/next_version.sh" 16.4.6 19.2.9
