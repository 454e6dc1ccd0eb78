#!/bin/bash
# libvirt domains whose <emulator> is ferry-qemu, on a private libvirtd +
# virtlogd (own mount namespace, as in libvirt-probe.sh) configured as Debian
# ships it: the emulator runs as libvirt-qemu, in a private /dev, its files
# labelled by the DAC driver. Usage (as root):
#   unshare --mount --propagation private bash libvirt-domain.sh WORK FERRY_QEMU KERNEL [MODE]
# MODE lifecycle (the default): one domain, defined as Nova defines them
#   (<sysinfo type='smbios'> with <smbios mode='sysinfo'/>, the HPET off,
#   a rate-limited virtio-rng), through define, start, suspend/resume,
#   pmemsave, save, restore, pmemsave, destroy. Leaves in
#   $WORK: dumps/mem-before-save.raw, dumps/mem-after-restore.raw (pmemsave
#   dumps of the 128 MiB guest), lab.save.
# MODE qcow2: a domain whose disk is a qcow2 over a raw base image starts;
#   prints "BLKLIST <path>", "BLKINFO Capacity|Allocation|Physical <bytes>"
#   and "NODE <node-name>" (query-named-block-nodes) lines.
# MODE cdrom: a domain with Nova's config drive (an ISO, genisoimage -r -J
#   -V config-2, on an IDE CD-ROM: <disk device='cdrom'> <target bus='ide'>)
#   starts; its guest reads the file's sector from the drive. Prints
#   "CDROM <the guest's cdrom: line>", "EXPECT <lba> <hex of 16 bytes>",
#   "BLKLIST <target> <path>" and "BLKINFO Capacity <bytes>".
# MODE serial: a domain with <serial type='pty'><log file=.../> and one with
#   <serial type='file'> (libvirt passes both outputs as fd sets: virtlogd's
#   pipes) start; the guests' output reaches the log and the file.
# Both leave the libvirt logs under $WORK/var-log-libvirt/ and print
# "EMULATOR <domain> user=U group=G dev=private|shared groups=GIDS" and
# "DEV <domain> <what its /dev holds>" per started domain.
# Prints "STEP ..." lines; exits non-zero at the first failing step.
set -euo pipefail; [ -n "${TRACE:-}" ] && set -x
WORK=$1; BIN=$2; KERNEL=$3; MODE=${4:-lifecycle}
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
# qemu.conf as packaged: user, group, namespaces and security_driver unset
# (the emulator runs as libvirt-qemu:libvirt-qemu with its supplementary
# group kvm, in a private /dev, files labelled by DAC; no AppArmor here).
# One deviation, because this machine's cgroupfs is the host's (no cgroup
# namespace): with controllers libvirt makes /sys/fs/cgroup/*/machine and
# machine/qemu-ID-NAME.libvirt-qemu in it, and leaves the first behind
# (measured); a second lab running at once (every libvirtd numbers domains
# from 1) would share those cgroups.
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
libvirtd -d -p /run/libvirt/libvirtd.pid
NAMES=("$NAME")
cleanup() {
    for n in "${NAMES[@]}"; do virsh -c qemu:///system destroy "$n" >/dev/null 2>&1 || true; done
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
serial_grows() {  # [FILE]: a file the guest's serial output goes to
    local log=${1:-/var/log/libvirt/qemu/$NAME-serial.log} a b
    a=$(stat -c %s "$log" 2>/dev/null || echo 0)
    for _ in $(seq 100); do
        sleep 0.1
        b=$(stat -c %s "$log" 2>/dev/null || echo 0)
        [ "$b" -gt "$a" ] && return 0
    done
    echo "no heartbeats in $log (size $a)" >&2
    return 1
}
ready_in() {  # FILE: waits for the dirtier's first line there
    for _ in $(seq 600); do
        grep -q 'dirtier: ready' "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no 'dirtier: ready' in $1" >&2
    return 1
}
emulator_pid() { cat "/run/libvirt/qemu/$1.pid"; }
# Who runs domain $1's emulator, and whether its /dev is its own (a mount
# namespace of its own: libvirt's namespaces = [ "mount" ]).
emulator() {
    local pid dev=shared
    pid=$(emulator_pid "$1")
    [ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] && dev=private
    echo "EMULATOR $1 user=$(stat -c %U "/proc/$pid") group=$(stat -c %G "/proc/$pid") dev=$dev" \
        "groups=$(awk '/^Groups:/ { $1 = ""; print }' "/proc/$pid/status" | tr -s ' ' | sed 's/^ //')"
    echo "DEV $1 $(ls "/proc/$pid/root/dev" | tr '\n' ' ')"
}
pmemsave() {
    V qemu-monitor-command "$NAME" \
        "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":$MEM,\"filename\":\"$1\"}}"
}
define() {  # NAME SERIAL-XML [DOMAIN-XML [OS-XML]]
    cat > "$WORK/$1.xml" <<XML
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  ${3:-}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$WORK/dirtier.elf</kernel>
    <cmdline>${CMDLINE:-ws=16M fill=1}</cmdline>
    ${4:-}
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>$WORK/bin/ferry-qemu</emulator>
    $2
  </devices>
</domain>
XML
    V define "$WORK/$1.xml"
}

if [ "$MODE" = serial ]; then
    PTY=$NAME-pty FILE=$NAME-file
    NAMES=("$PTY" "$FILE")
    step define
    define "$PTY" "<serial type='pty'>
      <log file='/var/log/libvirt/qemu/$PTY-serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>"
    define "$FILE" "<serial type='file'>
      <source path='/var/log/libvirt/qemu/$FILE-serial.log' append='on'/>
      <target port='0'/>
    </serial>"
    for n in "${NAMES[@]}"; do
        step "start $n"; V start "$n"
        NAME=$n state_is running
        emulator "$n"
    done
    for n in "${NAMES[@]}"; do
        step "output $n"
        ready_in "/var/log/libvirt/qemu/$n-serial.log"
        serial_grows "/var/log/libvirt/qemu/$n-serial.log"
    done
    V ttyconsole "$PTY"
    for n in "${NAMES[@]}"; do
        step "destroy $n"; V destroy "$n"; NAME=$n state_is "shut off"
    done
    step done
    exit 0
fi

if [ "$MODE" = cdrom ]; then
    mkdir -p "$WORK/config-drive/openstack/latest"
    printf 'ferry config drive: instance-0001\n' > "$WORK/config-drive/ferry.txt"
    echo '{"uuid": "c7a5fdbd-cdaf-9455-926a-d65c16db1809"}' \
        > "$WORK/config-drive/openstack/latest/meta_data.json"
    genisoimage -quiet -r -J -V config-2 -o "$WORK/disk.config" "$WORK/config-drive"
    LBA=$(isoinfo -l -i "$WORK/disk.config" | sed -n 's/.*\[ *\([0-9]*\) [0-9]*\] *FERRY\.TXT.*/\1/p')
    echo "EXPECT $LBA $(head -c 16 "$WORK/config-drive/ferry.txt" | od -An -tx1 | tr -d ' \n')"
    step define
    CMDLINE="ws=4M cdrom=$LBA" define "$NAME" "<disk type='file' device='cdrom'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='$WORK/disk.config'/>
      <target dev='hdd' bus='ide'/>
      <readonly/>
    </disk>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/$NAME-serial.log' append='on'/>
      <target port='0'/>
    </serial>"
    step start; V start "$NAME"
    state_is running
    emulator "$NAME"
    ready_in "/var/log/libvirt/qemu/$NAME-serial.log"
    sed -n 's/^.*\(cdrom: .*\)$/CDROM \1/p' "/var/log/libvirt/qemu/$NAME-serial.log"
    step domblk
    V domblklist "$NAME" | sed -n 's/^ *\(hd[a-d]\) *\(\/.*\)$/BLKLIST \1 \2/p'
    V domblkinfo "$NAME" hdd | sed -n 's/^\(Capacity\): *\([0-9]*\)$/BLKINFO \1 \2/p'
    step destroy; V destroy "$NAME"; state_is "shut off"
    step done
    exit 0
fi

if [ "$MODE" = qcow2 ]; then
    # Nova's disk: a qcow2 over a raw _base, its backing chain as the
    # header names it (libvirt reads it and writes the -blockdev chain).
    mkdir -p "$WORK/images"
    qemu-img create -q -f raw "$WORK/images/base.raw" 64M
    qemu-img create -q -f qcow2 -b "$WORK/images/base.raw" -F raw "$WORK/images/disk.qcow2"
    step define
    define "$NAME" "<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$WORK/images/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='/var/log/libvirt/qemu/$NAME-serial.log' append='on'/>
      <target port='0'/>
    </serial>"
    step start; V start "$NAME"
    state_is running
    emulator "$NAME"
    ready_in "/var/log/libvirt/qemu/$NAME-serial.log"
    step domblk
    V domblklist "$NAME" --details | sed -n 's/^ *file *disk *vda */BLKLIST /p'
    V domblkinfo "$NAME" vda | sed -n 's/^\([A-Za-z]*\): *\([0-9]*\)$/BLKINFO \1 \2/p'
    V qemu-monitor-command "$NAME" '{"execute":"query-named-block-nodes","arguments":{"flat":true}}' \
        | tr ',' '\n' | sed -n 's/.*"node-name":"\([^"]*\)".*/NODE \1/p'
    step destroy; V destroy "$NAME"; state_is "shut off"
    step done
    exit 0
fi

# What Nova writes into every domain (nova/virt/libvirt/config.py), with
# an entropy device as Nova gives one (rate-limited), which must survive
# the save and restore with the rest.
NOVA_UUID=c7a5fdbd-cdaf-9455-926a-d65c16db1809
define "$NAME" "<serial type='pty'>
      <log file='/var/log/libvirt/qemu/$NAME-serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <rng model='virtio'>
      <rate period='1000' bytes='1024'/>
      <backend model='random'>/dev/urandom</backend>
    </rng>" \
    "<uuid>$NOVA_UUID</uuid>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
      <entry name='version'>26.1.0</entry>
      <entry name='serial'>$NOVA_UUID</entry>
      <entry name='uuid'>$NOVA_UUID</entry>
      <entry name='family'>Virtual Machine</entry>
    </system>
  </sysinfo>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='hpet' present='no'/>
  </clock>" \
    "<smbios mode='sysinfo'/>"
step start;    V start "$NAME"
state_is running
emulator "$NAME"
# pmemsave writes as the emulator's user, as QEMU's does: into a dir of its own.
install -d -o "$(stat -c %u "/proc/$(emulator_pid "$NAME")")" "$WORK/dumps"
step heartbeats; serial_grows
ready_in "/var/log/libvirt/qemu/$NAME-serial.log"
V ttyconsole "$NAME"
step suspend;  V suspend "$NAME"; state_is paused
step resume;   V resume "$NAME";  state_is running; serial_grows
# The dirty rate as an operator checks it before a migration, and Nova's
# announce_self workaround (HMP through libvirt).
step dirtyrate; V domdirtyrate-calc "$NAME" --seconds 1
for _ in $(seq 600); do
    V domstats --dirtyrate "$NAME" | grep -q 'dirtyrate.calc_status=2' && break
    sleep 0.1
done
V domstats --dirtyrate "$NAME" | sed -n 's/^ *dirtyrate\.megabytes_per_second=/DIRTYRATE /p'
step hmp
echo "HMP announce_self [$(V qemu-monitor-command --hmp "$NAME" announce_self | tr -d '\r\n')]"
echo "HMP info status [$(V qemu-monitor-command --hmp "$NAME" info status | tr -d '\r\n')]"
step pmemsave-before-save
V suspend "$NAME"; state_is paused
pmemsave "$WORK/dumps/mem-before-save.raw"
step save;     V save "$NAME" "$WORK/lab.save"
state_is "shut off"
step restore;  V restore --running "$WORK/lab.save"  # saved while paused: libvirt would restore it paused
state_is running
emulator "$NAME"
serial_grows
step pmemsave-after-restore
V suspend "$NAME"; state_is paused
pmemsave "$WORK/dumps/mem-after-restore.raw"
V resume "$NAME"; state_is running
step destroy;  V destroy "$NAME"; state_is "shut off"
step done
