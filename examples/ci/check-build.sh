#!/bin/sh
# CI step for any runner (GitLab, Jenkins, Buildkite): build, print the summary, fail on a missed budget.
# Usage: examples/ci/check-build.sh [CONFIG] ; exit code is edgetune's (1 = budget missed).
set -u
CONFIG=${1:-examples/smollm2-lora-cpu.toml}
EDGETUNE=${EDGETUNE:-.venv/bin/edgetune}
"$EDGETUNE" build "$CONFIG" --json > build-result.json
status=$?
python3 - build-result.json <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
for t in r.get("targets", []):
    print(f"{t['target']:<16} {t['result']:<28} size {t['size_mb']} MB  {t['accuracy']}  {t['latency']}")
PY
case $status in
  0) echo "edge bundle: all budgets met" ;;
  1) echo "edge bundle: a budget was missed (see .work/validate-*/report.md); failing the build" >&2 ;;
  *) echo "edge bundle: edgetune failed with exit $status" >&2 ;;
esac
exit $status
