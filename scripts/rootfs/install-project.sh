#!/bin/sh
# Install vmem_guest into the systemd test guest's root the way docs/install.md and
# docs/systemd.md tell a user to, with no network: scripts/build-rootfs.sh runs this
# inside that root (chroot) with $1 a copy of the checkout's files that go into the
# package and contrib/. What only a running system can do (daemon-reload, udevadm
# control --reload, systemctl start) is left out: the guest boots with all of it done.
set -eu
cd "$1"

# docs/install.md, "With Debian 12's packages" (the packages are in the base image).
python3 -m venv --system-site-packages /opt/vmem-guest
/opt/vmem-guest/bin/pip install --quiet --no-cache-dir --no-index --no-deps \
    --no-build-isolation .
# docs/install.md, "After either install".
ln -s /opt/vmem-guest/bin/vmem-guest /usr/local/bin/vmem-guest
mkdir -p /usr/local/share/man/man1
ln -s /opt/vmem-guest/share/man/man1/vmem-guest.1 /usr/local/share/man/man1/
vmem-guest --version

# docs/systemd.md: the unit, its options (this VM has no vIOMMU: --noiommu), the udev
# rule that starts it when a virtio-mem device appears; then enable it.
install -m 644 contrib/vmem-guest.service /etc/systemd/system/
install -m 644 contrib/vmem-guest.default /etc/default/vmem-guest
sed -i 's/^VMEM_GUEST_OPTS=.*/VMEM_GUEST_OPTS="--noiommu"/' /etc/default/vmem-guest
grep -qx 'VMEM_GUEST_OPTS="--noiommu"' /etc/default/vmem-guest
install -m 644 contrib/70-vmem-guest.rules /etc/udev/rules.d/
systemctl enable vmem-guest
# docs/lifecycle.md, "Hibernation": memory given back before systemd hibernates.
install -m 644 contrib/vmem-guest-hibernate@.service /etc/systemd/system/
systemctl enable vmem-guest-hibernate@hibernate vmem-guest-hibernate@hybrid-sleep \
    vmem-guest-hibernate@suspend-then-hibernate
