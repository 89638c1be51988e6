#!/usr/bin/env bash
# The whole test suite: starts what the tests need (see with-services.sh),
# builds every binary, runs every test. Called by `make test` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .ci/with-services.sh bash -c '
  set -euo pipefail
  cargo build --release --workspace --bins
  cargo test --release --workspace -- --test-threads="${TEST_THREADS:-1}"
'
