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

missing=()
for p in "${WANT[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "debian-python: all present (${WANT[*]})"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "debian-python: missing ${missing[*]} and not root (no passwordless sudo);" \
            "install them with: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "debian-python: missing ${missing[*]} and apt-get is not available" >&2
    exit 1
fi

echo "debian-python: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "debian-python: done"
