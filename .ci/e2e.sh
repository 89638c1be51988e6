#!/usr/bin/env bash
# `make e2e`: PostgreSQL, the test cluster (control plane, real Job controller,
# the pod agent running the Jobs' pods with runc) and the operator; imports
# the real 100,000-row file (POSTCODE_DATA_DIR or ../shared/data; the samples
# otherwise, as the tests say) (4 shards, offline provider, the NSPL file
# mounted into the enricher pods from a PersistentVolumeClaim through
# spec.podTemplate), waits for Succeeded, checks results.csv and how the pods
# ran. The last line is `E2E PASSED …` or `E2E FAILED …`.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
.ci/with-services.sh bash -c '
  set -euo pipefail
  cargo build --release --workspace --bins
  cargo test --release -p postcode-operator --test operator_e2e -- --nocapture --exact e2e_upload_the_real_file_and_read_the_results
' 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
line=$(grep -oE "E2E (PASSED|FAILED) .*" "$log" | tail -1)
rm -f "$log"
if [[ $rc -eq 0 && $line == "E2E PASSED"* ]]; then
  echo "$line"
  exit 0
fi
echo "${line:-E2E FAILED (no result line; see the output above)}"
exit 1
