#!/usr/bin/env bash
# Install the Debian packages that vmem-guest runs on when installed "the Debian way"
# (docs/install.md): Debian's own click and pyudev, the venv module, setuptools and wheel
# (pip install --no-build-isolation builds with them), and pytest and the shells for the
# CLI tests `make test-debian-packages` runs against them.
# Idempotent: packages already installed are skipped, and `apt-get update` runs at most
# once per call (only when something is missing). Needs root (or passwordless sudo).
#
#   scripts/install-debian-python.sh            # runtime + test packages
#   scripts/install-debian-python.sh --runtime  # only what installing vmem-guest needs
set -euo pipefail

RUNTIME_PKGS=(python3 python3-venv python3-click python3-pyudev python3-setuptools
    python3-wheel)
# zsh and fish: test_completion sets up each shell's completion as docs/install.md says.
TEST_PKGS=(python3-pytest zsh fish)

case "${1:-all}" in
    --runtime) WANT=("${RUNTIME_PKGS[@]}") ;;
    all | --all) WANT=("${RUNTIME_PKGS[@]}" "${TEST_PKGS[@]}") ;;
    *) echo "usage: $0 [--runtime|--all]" >&2; exit 2 ;;
esac

exec bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" debian-python "${WANT[@]}"
