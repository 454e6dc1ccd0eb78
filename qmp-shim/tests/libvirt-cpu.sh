#!/bin/bash
# libvirt domains with ferry-qemu and each CPU mode: starts one domain per
# <cpu> element below on a private libvirtd (as libvirt-domain.sh), prints
# "CPU <name> <-cpu argument> <result>" per domain, "LIVECPU <name> <cpu XML>"
# (libvirt's live XML) per started domain, the blocked-reasons of the
# invtsc domain and virsh's answer to migrating it (to this same libvirtd,
# over TCP on 127.0.0.1:16599: the Begin phase must refuse first). One more
# domain pins pc-i440fx-4.2: "MACHINE" has its -machine argument, "QOMMACHINE"
# its QOM type; "Q35" is virsh's answer to defining a q35 domain.
# Usage (as root):
#   unshare --mount --propagation private bash libvirt-cpu.sh WORK FERRY_QEMU KERNEL
set -uo pipefail
WORK=$1; BIN=$2; KERNEL=$3
mkdir -p "$WORK"; chmod 755 "$WORK"
for d in etc-libvirt var-lib-libvirt var-cache-libvirt var-log-libvirt/qemu run-libvirt bin; do
    mkdir -p "$WORK/$d"
done
cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
cp -a /var/lib/libvirt/. "$WORK/var-lib-libvirt/"
rm -rf "$WORK/var-cache-libvirt/qemu/capabilities"
rm -f "$WORK/etc-libvirt/qemu/networks/autostart/"* "$WORK/etc-libvirt/qemu/"*.xml
install -m 0755 "$BIN" "$WORK/bin/ferry-qemu"
install -m 0644 "$KERNEL" "$WORK/dirtier.elf"
cat >> "$WORK/etc-libvirt/libvirtd.conf" <<'CONF'
log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_monitor_json 1:qemu.qemu_process 1:qemu.qemu_capabilities 1:qemu.qemu_migration 1:util.command 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "16599"
auth_tcp = "none"
CONF
# qemu.conf as packaged (the emulator runs as libvirt-qemu in a private
# /dev, DAC labels) but for cgroup_controllers: this machine's cgroupfs is
# the host's; see libvirt-domain.sh.
cat >> "$WORK/etc-libvirt/qemu.conf" <<'CONF'
cgroup_controllers = [ ]
CONF
mount --bind "$WORK/etc-libvirt" /etc/libvirt
mount --bind "$WORK/var-lib-libvirt" /var/lib/libvirt
mkdir -p /var/cache/libvirt
mount --bind "$WORK/var-cache-libvirt" /var/cache/libvirt
mount --bind "$WORK/var-log-libvirt" /var/log/libvirt
mkdir -p /run/libvirt
mount --bind "$WORK/run-libvirt" /run/libvirt
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -l -p /run/libvirt/libvirtd.pid
V() { timeout 60 virsh -c qemu:///system "$@"; }
NAMES=()
cleanup() {
    for n in "${NAMES[@]}"; do V destroy "$n" >/dev/null 2>&1; done
    kill "$(cat /run/libvirt/libvirtd.pid 2>/dev/null)" 2>/dev/null || true
    kill "$(cat /run/libvirt/virtlogd.pid 2>/dev/null)" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
domain() {  # NAME CPU-XML [MACHINE]
    NAMES+=("$1")
    cat > "$WORK/$1.xml" <<XML
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='${3:-pc}'>hvm</type><kernel>$WORK/dirtier.elf</kernel>
      <cmdline>ws=4M</cmdline></os>
  $2
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>$WORK/bin/ferry-qemu</emulator>
    <serial type='pty'><log file='/var/log/libvirt/qemu/$1-serial.log' append='on'/><target port='0'/></serial>
  </devices>
</domain>
XML
    V define "$WORK/$1.xml" >/dev/null || { echo "CPU $1 - define-failed"; return; }
    local out rc arg
    out=$(V start "$1" 2>&1); rc=$?
    arg=$(grep -o -- '-cpu [^ ]*' "/var/log/libvirt/qemu/$1.log" | tail -1 | cut -c6-)
    if [ $rc -eq 0 ]; then
        echo "CPU $1 ${arg:--} started"
        # The live CPU, which libvirt fixes from the CPU object's properties.
        echo "LIVECPU $1 $(V dumpxml "$1" | tr -d '\n' | grep -o '<cpu .*</cpu>\|<cpu [^>]*/>' | tr -s ' ')"
    else
        echo "CPU $1 ${arg:--} refused: $(echo "$out" | tr '\n' ' ')"
    fi
}
domain passthrough "<cpu mode='host-passthrough'/>"
domain qemu64 "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>"
# qemu64 with libvirt's default check (partial for KVM) and with check='full'.
domain qemu64partial "<cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>"
domain qemu64full "<cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model></cpu>"
domain hostmodel "<cpu mode='host-model'/>"
domain invtsc "<cpu mode='host-passthrough' migratable='off'><feature policy='require' name='invtsc'/></cpu>"
# A machine type pinned by an older QEMU (Nova keeps it per instance); q35
# is not offered, so libvirt refuses it at define.
domain i440fx42 "<cpu mode='host-passthrough'/>" pc-i440fx-4.2
echo "MACHINE i440fx42 $(grep -o -- '-machine [^ ]*' /var/log/libvirt/qemu/i440fx42.log | tail -1 | cut -c10-)"
echo "QOMMACHINE $(V qemu-monitor-command i440fx42 '{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}')"
sed "s/machine='pc'/machine='q35'/; s/<name>passthrough</<name>q35</" "$WORK/passthrough.xml" > "$WORK/q35.xml"
echo "Q35 $(V define "$WORK/q35.xml" 2>&1 | tr '\n' ' ')"
echo "BLOCKED $(V qemu-monitor-command invtsc '{"execute":"query-migrate"}')"
echo "UNBLOCKED $(V qemu-monitor-command passthrough '{"execute":"query-migrate"}')"
echo "MIGRATE $(V migrate --live invtsc qemu+tcp://127.0.0.1:16599/system 2>&1 | tr '\n' ' ')"
echo "QMPMIGRATE $(V qemu-monitor-command invtsc '{"execute":"migrate","arguments":{"uri":"exec:cat >/dev/null"}}' 2>&1 | tr '\n' ' ')"
echo "STATE invtsc $(V domstate invtsc | head -1)"
# libvirtd answers after all that (a cheap call: `capabilities` probes every
# QEMU binary anew, which can take past the timeout on a loaded machine).
V list --all >/dev/null && echo "LIBVIRTD alive"
