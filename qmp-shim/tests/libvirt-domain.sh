#!/bin/bash
# A libvirt domain whose <emulator> is ferry-qemu, through its lifecycle:
# define, start, suspend/resume, pmemsave, save, restore, pmemsave, destroy.
# Runs a private libvirtd + virtlogd (own mount namespace, as in
# libvirt-probe.sh). Usage (as root):
#   unshare --mount --propagation private bash libvirt-domain.sh WORK FERRY_QEMU KERNEL
# Leaves in $WORK: mem-before-save.raw, mem-after-restore.raw (pmemsave dumps
# of the 128 MiB guest), lab.save, the libvirt logs under var-log-libvirt/.
# Prints "STEP ..." lines; exits non-zero at the first failing step.
set -euo pipefail; [ -n "${TRACE:-}" ] && set -x
WORK=$1; BIN=$2; KERNEL=$3
NAME=ferrylab
MEM=$((128 * 1024 * 1024))
mkdir -p "$WORK"
chmod 755 "$WORK"
for d in etc-libvirt var-lib-libvirt var-cache-libvirt var-log-libvirt/qemu run-libvirt bin; do
    mkdir -p "$WORK/$d"
done
cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
cp -a /var/lib/libvirt/. "$WORK/var-lib-libvirt/"
cp -a /var/cache/libvirt/. "$WORK/var-cache-libvirt/" 2>/dev/null || true
rm -rf "$WORK/var-cache-libvirt/qemu/capabilities"
rm -f "$WORK/etc-libvirt/qemu/networks/autostart/"* "$WORK/etc-libvirt/qemu/"*.xml
install -m 0755 "$BIN" "$WORK/bin/ferry-qemu"
install -m 0644 "$KERNEL" "$WORK/dirtier.elf"
cat >> "$WORK/etc-libvirt/libvirtd.conf" <<'CONF'
log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_monitor_json 1:qemu.qemu_process 1:qemu.qemu_capabilities 1:qemu.qemu_migration 1:qemu.qemu_driver 1:util.command 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
CONF
# /dev/kvm is root-only here: run the emulator as root, without libvirt's
# per-VM /dev (namespaces) and without cgroups (shared with the host).
cat >> "$WORK/etc-libvirt/qemu.conf" <<'CONF'
cgroup_controllers = [ ]
user = "root"
group = "root"
namespaces = [ ]
security_driver = "none"
CONF
mount --bind "$WORK/etc-libvirt" /etc/libvirt
mount --bind "$WORK/var-lib-libvirt" /var/lib/libvirt
mkdir -p /var/cache/libvirt
mount --bind "$WORK/var-cache-libvirt" /var/cache/libvirt
mount --bind "$WORK/var-log-libvirt" /var/log/libvirt
mkdir -p /run/libvirt
mount --bind "$WORK/run-libvirt" /run/libvirt
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -p /run/libvirt/libvirtd.pid
cleanup() {
    virsh -c qemu:///system destroy "$NAME" >/dev/null 2>&1 || true
    kill "$(cat /run/libvirt/libvirtd.pid 2>/dev/null)" 2>/dev/null || true
    kill "$(cat /run/libvirt/virtlogd.pid 2>/dev/null)" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do
    [ -S /run/libvirt/libvirt-sock ] && break
    sleep 0.1
done
V() { virsh -c qemu:///system "$@"; }
step() { echo "STEP $*"; }
state_is() {
    local s
    for _ in $(seq 50); do
        s=$(V domstate "$NAME" 2>&1 || true)
        s=${s%%$'\n'*}
        [ "$s" = "$1" ] && return 0
        sleep 0.1
    done
    echo "domstate is '$s', expected '$1'" >&2
    return 1
}
serial_grows() {
    local log=/var/log/libvirt/qemu/$NAME-serial.log a b
    a=$(stat -c %s "$log" 2>/dev/null || echo 0)
    for _ in $(seq 100); do
        sleep 0.1
        b=$(stat -c %s "$log" 2>/dev/null || echo 0)
        [ "$b" -gt "$a" ] && return 0
    done
    echo "no heartbeats in $log (size $a)" >&2
    return 1
}
pmemsave() {
    V qemu-monitor-command "$NAME" \
        "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":$MEM,\"filename\":\"$1\"}}"
}

cat > "$WORK/$NAME.xml" <<XML
<domain type='kvm'>
  <name>$NAME</name>
  <uuid>f0f0f0f0-1111-4222-8333-444444444444</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$WORK/dirtier.elf</kernel>
    <cmdline>ws=16M fill=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>$WORK/bin/ferry-qemu</emulator>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/$NAME-serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
XML
step define;   V define "$WORK/$NAME.xml"
step start;    V start "$NAME"
state_is running
step heartbeats; serial_grows
for _ in $(seq 600); do
    grep -q 'dirtier: ready' "/var/log/libvirt/qemu/$NAME-serial.log" && break
    sleep 0.1
done
grep -q 'dirtier: ready' "/var/log/libvirt/qemu/$NAME-serial.log"
V ttyconsole "$NAME"
step suspend;  V suspend "$NAME"; state_is paused
step resume;   V resume "$NAME";  state_is running; serial_grows
step pmemsave-before-save
V suspend "$NAME"; state_is paused
pmemsave "$WORK/mem-before-save.raw"
step save;     V save "$NAME" "$WORK/lab.save"
state_is "shut off"
step restore;  V restore --running "$WORK/lab.save"  # saved while paused: libvirt would restore it paused
state_is running
serial_grows
step pmemsave-after-restore
V suspend "$NAME"; state_is paused
pmemsave "$WORK/mem-after-restore.raw"
V resume "$NAME"; state_is running
step destroy;  V destroy "$NAME"; state_is "shut off"
step done
