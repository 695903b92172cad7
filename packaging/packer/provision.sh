#!/bin/sh
# Runs as root on the image's build VM (packaging/packer/relay.pkr.hcl), before
# waagent's deprovisioning. Installs the relay package (enabled, not started: it has no
# configuration until cloud-init writes it at first boot), turns off every swap, and
# keeps the serial console on ttyS0.
set -eu
export DEBIAN_FRONTEND=noninteractive

apt-get update -q
apt-get install -y -q /tmp/failback-relay.deb
rm -f /tmp/failback-relay.deb
systemctl is-enabled relay.service

# No swap: none on the OS disk (a swap file or partition of the base image, if any, is
# removed from fstab), none made by waagent on the resource disk.
swapoff -a
sed -i '/\sswap\s/d' /etc/fstab
sed -i 's/^ResourceDisk.EnableSwap=.*/ResourceDisk.EnableSwap=n/' /etc/waagent.conf
grep -q '^ResourceDisk.EnableSwap=n' /etc/waagent.conf ||
    echo 'ResourceDisk.EnableSwap=n' >>/etc/waagent.conf

# The serial console: kernel messages and a login on ttyS0 (Azure's serial console
# needs boot diagnostics on the VM as well).
mkdir -p /etc/default/grub.d
cat >/etc/default/grub.d/60-failback-serial.cfg <<'GRUB'
GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT console=tty1 console=ttyS0,115200n8 earlyprintk=ttyS0,115200"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB
update-grub
systemctl enable serial-getty@ttyS0.service

apt-get clean
