#!/bin/sh
# Install vmem_guest into the systemd test guest's root the way docs/install.md and
# docs/systemd.md tell a user to, with no network: scripts/build-rootfs.sh runs this
# inside that root (chroot) with $1 holding the wheel built on the host (dist/*.whl)
# and the checkout's contrib/ directory. What only a running system can do
# (daemon-reload, udevadm control --reload, systemctl start) is left out: the guest
# boots with all of it in place.
set -eu
src="$1"

# docs/install.md: Debian's packages (in the base image), a virtualenv that sees them,
# the project from its wheel without dependencies (they are Debian's).
python3 -m venv --system-site-packages /opt/vmem-guest
/opt/vmem-guest/bin/pip install --no-index --no-deps --no-cache-dir --quiet "$src"/dist/*.whl

# docs/systemd.md: the unit, its options (this VM has no vIOMMU: --noiommu), the udev
# rule that starts it when a virtio-mem device appears; then enable it.
install -m 644 "$src/contrib/vmem-guest.service" /etc/systemd/system/
install -m 644 "$src/contrib/vmem-guest.default" /etc/default/vmem-guest
sed -i 's/^VMEM_GUEST_OPTS=.*/VMEM_GUEST_OPTS="--noiommu"/' /etc/default/vmem-guest
grep -qx 'VMEM_GUEST_OPTS="--noiommu"' /etc/default/vmem-guest
install -m 644 "$src/contrib/70-vmem-guest.rules" /etc/udev/rules.d/
systemctl enable vmem-guest
