#!/usr/bin/env bash
# Install the Debian packages named, skipping those already installed; `apt-get update`
# runs at most once per call (only when something is missing). Needs root (or
# passwordless sudo). The project's install scripts call it with their own tag:
#
#   scripts/apt-install.sh TAG PACKAGE...     # TAG prefixes every message
set -euo pipefail

TAG="${1:?usage: $0 TAG PACKAGE...}"
shift
WANT=("$@")

missing=()
for p in "${WANT[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "$TAG: all present (${WANT[*]})"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "$TAG: missing ${missing[*]} and not root (no passwordless sudo);" \
            "install them with: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$TAG: missing ${missing[*]} and apt-get is not available" >&2
    exit 1
fi

echo "$TAG: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "$TAG: done"
