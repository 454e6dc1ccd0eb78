#!/bin/bash
# Runs `virsh domcapabilities` against a private libvirtd (own mount
# namespace: /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt,
# /var/log/libvirt and /run/libvirt are bind mounts of copies under $WORK),
# with ferry-qemu as the emulator. Usage (as root):
#   unshare --mount --propagation private bash libvirt-probe.sh WORK FERRY_QEMU [VIRTTYPE]
# Prints virsh's output (the default machine's, then pc-i440fx-4.2's); exits
# non-zero on failure. Leaves the libvirtd log in
# $WORK/var-log-libvirt/libvirtd.log.
set -euo pipefail
WORK=$1; BIN=$2; VIRTTYPE=${3:-kvm}
mkdir -p "$WORK"
chmod 755 "$WORK"
for d in etc-libvirt var-lib-libvirt var-cache-libvirt var-log-libvirt run-libvirt bin; do
    mkdir -p "$WORK/$d"
done
cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
cp -a /var/lib/libvirt/. "$WORK/var-lib-libvirt/"
cp -a /var/cache/libvirt/. "$WORK/var-cache-libvirt/" 2>/dev/null || true
rm -rf "$WORK/var-cache-libvirt/qemu/capabilities"
rm -f "$WORK/etc-libvirt/qemu/networks/autostart/"*
install -m 0755 "$BIN" "$WORK/bin/ferry-qemu"
cat >> "$WORK/etc-libvirt/libvirtd.conf" <<'CONF'
log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_monitor_json 1:qemu.qemu_process 1:qemu.qemu_capabilities 1:util.command 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
CONF
echo 'cgroup_controllers = [ ]' >> "$WORK/etc-libvirt/qemu.conf"
mount --bind "$WORK/etc-libvirt" /etc/libvirt
mount --bind "$WORK/var-lib-libvirt" /var/lib/libvirt
mkdir -p /var/cache/libvirt
mount --bind "$WORK/var-cache-libvirt" /var/cache/libvirt
mount --bind "$WORK/var-log-libvirt" /var/log/libvirt
mkdir -p /run/libvirt
mount --bind "$WORK/run-libvirt" /run/libvirt
libvirtd -d -p /run/libvirt/libvirtd.pid
trap 'kill "$(cat /run/libvirt/libvirtd.pid 2>/dev/null)" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [ -S /run/libvirt/libvirt-sock ] && break
    sleep 0.1
done
virsh -c qemu:///system domcapabilities --emulatorbin "$WORK/bin/ferry-qemu" \
    --virttype "$VIRTTYPE" --arch x86_64
# A versioned machine type (from the cached probe).
virsh -c qemu:///system domcapabilities --emulatorbin "$WORK/bin/ferry-qemu" \
    --virttype "$VIRTTYPE" --arch x86_64 --machine pc-i440fx-4.2
