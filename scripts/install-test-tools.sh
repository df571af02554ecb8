#!/usr/bin/env bash
# Builds, once, the test-only tools that are not Debian packages: s3s-fs, a real S3-compatible
# server (from crates.io) that the S3 backend tests start on loopback. Cached under
# ~/.cache/vmatrix/tools; about 2 minutes on 2 cores the first time, nothing afterwards.
set -euo pipefail
tools="${HOME}/.cache/vmatrix/tools"
if [ -x "$tools/bin/s3s-fs" ]; then
  echo "install-test-tools: s3s-fs present"
  exit 0
fi
echo "install-test-tools: building s3s-fs 0.14.1 (once, ~2 min)"
# 0.14.1: newer releases need a newer rustc than Debian 12 machines carry.
cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$tools" --quiet
"$tools/bin/s3s-fs" --version
