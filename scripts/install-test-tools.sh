#!/usr/bin/env bash
# Installs, once, the test-only tools: s3s-fs, a real S3-compatible server (built from
# crates.io) that the S3 backend tests start on loopback; Debian's chromium and playwright-core
# (from npm) for the dashboard's browser test; systemd-analyze for the units. Idempotent, as root; cached under
# ~/.cache/vmatrix/tools. About 3 minutes the first time, nothing afterwards.
set -euo pipefail
tools="${HOME}/.cache/vmatrix/tools"
if [ -x "$tools/bin/s3s-fs" ]; then
  echo "install-test-tools: s3s-fs present"
else
  echo "install-test-tools: building s3s-fs 0.14.1 (once, ~2 min)"
  # 0.14.1: newer releases need a newer rustc than Debian 12 machines carry.
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$tools" --quiet
  "$tools/bin/s3s-fs" --version
fi
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# systemd-analyze checks the units in dist/systemd.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-tools: installing ${missing[*]} (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# playwright-core drives the system's chromium (no browser download); pinned for repeatability.
playwright="$tools/node/node_modules/playwright-core"
if [ -f "$playwright/package.json" ] && grep -q '"version": "1.49.1"' "$playwright/package.json"; then
  echo "install-test-tools: playwright-core present"
else
  echo "install-test-tools: installing playwright-core 1.49.1 (npm)"
  mkdir -p "$tools/node"
  npm install --silent --no-audit --no-fund --prefix "$tools/node" playwright-core@1.49.1
fi
