#!/usr/bin/env bash
# vmem-guest installed the Debian way (docs/install.md): Debian's python3 with Debian's
# click and pyudev, the project alone from this checkout, nothing from PyPI. Then the
# tests that need only the CLI and those libraries, with Debian's pytest.
#
#   scripts/test-debian-packages.sh [VENV]      # VENV defaults to .venv-debian
#
# The venv is kept between runs (recreated if it is not Debian's /usr/bin/python3 with
# the system's site-packages); the project is installed into it again on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv-debian}
PY=$VENV/bin/python
SYSTEM_PYTHON=/usr/bin/python3
TESTS=(
    tests/unit/test_cli.py
    tests/unit/test_completion.py
    tests/unit/test_manpage.py
    tests/unit/test_packaging.py
    tests/unit/test_pci.py
    tests/unit/test_pyudev_host.py
)

bash scripts/install-debian-python.sh

if ! { [ -x "$PY" ] && grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" &&
    grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg"; }; then
    echo "debian-packages: creating $VENV ($SYSTEM_PYTHON -m venv --system-site-packages)"
    rm -rf "$VENV"
    "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
fi

# --no-index: nothing may come from PyPI; the build backend is Debian's too.
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .

# Each library must be the one the Debian package installed: its files are dpkg's.
"$PY" - <<'EOF'
import importlib.metadata
import subprocess
import sys

failed = False
for module, package in (("click", "python3-click"), ("pyudev", "python3-pyudev")):
    where = importlib.import_module(module).__file__
    version = importlib.metadata.version(module)
    owner = subprocess.run(["dpkg-query", "-S", where], capture_output=True, text=True)
    debian = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    ).stdout
    ok = owner.stdout.startswith(f"{package}:") and debian.split("-")[0] == version
    failed |= not ok
    source = owner.stdout.split(":")[0] or "no Debian package"
    verdict = "ok" if ok else f"FAIL: not {package} {debian or '(not installed)'}"
    print(f"debian-packages: {module} {version} from {where} ({source} {debian}): {verdict}")
print(f"debian-packages: python {sys.version.split()[0]} ({sys.executable})")
sys.exit(1 if failed else 0)
EOF

"$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

for args in "--help" "run --help"; do
    # shellcheck disable=SC2086  # two words on purpose
    help=$("$VENV/bin/vmem-guest" $args)
    echo "debian-packages: vmem-guest $args: ${help%%$'\n'*}"
done
echo "debian-packages: all passed"
