#!/bin/bash
# twohosts.sh - two libvirt "hosts" (hosta 10.77.0.1, hostb 10.77.0.2) on one machine,
# for ferry-driver's integration tests. Adapted from shared/reference/libvirt/twohosts.sh.
#
# Each host = its own network + mount + UTS namespace, all three created by this script
# and bound under $FT/ns (a private bind mount), with private /etc/libvirt,
# /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt, /run/libvirt and /etc/hosts
# (bind mounts of $FT/hosts/<H>/...), its own virtlogd + libvirtd (--listen, TCP without
# auth), a distinct host_uuid, and a veth pair between the two network namespaces.
# $FT/shared is visible to both hosts at the same path (shared storage), $FT/shared/dumps
# writable by the emulator's user (libvirt-qemu); $FT/hosts/<H>/migrate-pki
# is host H's migrate_tls_x509_cert_dir (qemu.conf) for virsh migrate --tls.
# Nothing is created outside $FT except the veth pair, which lives inside the namespaces.
#
# usage:
#   twohosts.sh up          # tear down leftovers of a previous run, then bring both hosts up
#   twohosts.sh down        # stop everything started in the namespaces, unmount, rm -rf $FT
#   twohosts.sh sh A|B cmd...      # run a command inside host A or B (cwd kept)
#   twohosts.sh virsh A|B args...  # virsh -c qemu:///system inside host A or B
#   twohosts.sh status
#
# Environment:
#   FT          state dir (default /tmp/ferry-driver-twohosts)
#   FERRY_HOOK  path of a ferry binary: installed as both hosts' hooks/qemu.d/ferry
#   KEEP_LOGS=1 on down: keep $FT/hosts/*/var-log-libvirt (copied to $FT.logs)
set -euo pipefail

FT=${FT:-/tmp/ferry-driver-twohosts}
NS=$FT/ns
declare -A IP=([A]=10.77.0.1 [B]=10.77.0.2)
declare -A HN=([A]=hosta [B]=hostb)
declare -A UUID=([A]=a0a0a0a0-0000-4000-8000-00000000f00a [B]=b0b0b0b0-0000-4000-8000-00000000f00b)
declare -A VETH=([A]=fdrvA [B]=fdrvB)
PRIV=("etc-libvirt:/etc/libvirt" "var-lib-libvirt:/var/lib/libvirt" "var-cache-libvirt:/var/cache/libvirt"
      "var-log-libvirt:/var/log/libvirt" "run-libvirt:/run/libvirt")

log() { echo "[twohosts] $*" >&2; }

inhost() { # inhost A cmd...
  local h=$1; shift
  nsenter --net=$NS/$h.net --mount=$NS/$h.mnt --uts=$NS/$h.uts --wd="$PWD" -- "$@"
}

ns_alive() { [ -e $NS/$1.mnt ] && nsenter --mount=$NS/$1.mnt --net=$NS/$1.net true 2>/dev/null; }

check_prereqs() {
  local missing=() b
  [ "$(id -u)" = 0 ] || { echo "twohosts: needs root" >&2; exit 1; }
  for b in libvirtd virtlogd virsh nsenter unshare ip python3 mountpoint; do
    command -v $b >/dev/null 2>&1 || missing+=("$b")
  done
  if [ ${#missing[@]} -gt 0 ]; then echo "twohosts: missing ${missing[*]}" >&2; exit 1; fi
}

make_tree() { # make_tree H
  local h=$1 d=$FT/hosts/$1 ent name src
  mkdir -p $d
  for ent in "${PRIV[@]}"; do
    name=${ent%%:*}; src=${ent#*:}
    if [ "$name" = run-libvirt ]; then mkdir -p $d/$name; chmod 755 $d/$name; continue; fi
    if [ -d "$src" ]; then cp -a "$src" $d/$name; else mkdir -p $d/$name; chmod 755 $d/$name; fi
  done
  # the packaged default network would want dnsmasq/iptables; never autostart it
  rm -f $d/etc-libvirt/qemu/networks/autostart/*.xml
  rm -rf $d/etc-libvirt/hooks $d/var-cache-libvirt/qemu/capabilities/*
  # domains and logs of the system (if any) do not belong to the test hosts
  rm -f $d/etc-libvirt/qemu/*.xml $d/var-log-libvirt/qemu/* 2>/dev/null || true
  mkdir -p $d/var-lib-libvirt/images
  cat > $d/hosts <<EOF
127.0.0.1 localhost
${IP[A]} ${HN[A]}
${IP[B]} ${HN[B]}
EOF
  local lc=$d/etc-libvirt/libvirtd.conf qc=$d/etc-libvirt/qemu.conf
  touch $lc $qc
  sed -i '/^# ---- ferry twohosts ----/,$d' $lc $qc
  cat >> $lc <<EOF
# ---- ferry twohosts ----
listen_tls = 0
listen_tcp = 1
listen_addr = "${IP[$h]}"
auth_tcp = "none"
auth_unix_rw = "none"
host_uuid = "${UUID[$h]}"
log_filters = "1:qemu.qemu_migration 1:qemu.qemu_process 1:qemu.qemu_monitor_json 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >> $qc <<EOF
# ---- ferry twohosts ----
# As packaged otherwise: user, group, namespaces and security_driver unset (the
# emulator runs as libvirt-qemu in a private /dev, files labelled by DAC).
# Both daemons share one cgroupfs (the host's: no cgroup namespace) and would
# fight over machine/qemu-ID-NAME.libvirt-qemu (a migrating domain has the
# same name on both, and each daemon numbers domains from 1).
cgroup_controllers = [ ]
# TLS migration (virsh migrate --tls): each host its own x509 directory, empty
# until a test puts a CA and certificates there (libvirtd wants it to exist)
migrate_tls_x509_cert_dir = "$d/migrate-pki"
EOF
  mkdir -p $d/migrate-pki
  if [ -n "${FERRY_HOOK:-}" ]; then
    mkdir -p $d/etc-libvirt/hooks/qemu.d
    printf '#!/bin/sh\nexec %q hook "$@"\n' "$FERRY_HOOK" > $d/etc-libvirt/hooks/qemu.d/ferry
    chmod 755 $d/etc-libvirt/hooks/qemu.d/ferry
  fi
}

ns_up() {
  mkdir -p $NS
  if ! mountpoint -q $NS; then mount --bind $NS $NS; mount --make-private $NS; fi
  local h d
  mkdir -p /run/libvirt  # mount point; Debian's libvirt-daemon-system ships it already
  for h in A B; do
    d=$FT/hosts/$h
    touch $NS/$h.net $NS/$h.mnt $NS/$h.uts
    unshare --net=$NS/$h.net --mount=$NS/$h.mnt --uts=$NS/$h.uts --propagation private sh -ec "
      mount --bind $d/etc-libvirt /etc/libvirt
      mount --bind $d/var-lib-libvirt /var/lib/libvirt
      mount --bind $d/var-cache-libvirt /var/cache/libvirt
      mount --bind $d/var-log-libvirt /var/log/libvirt
      mount --bind $d/run-libvirt /run/libvirt
      mount --bind $d/hosts /etc/hosts
      hostname ${HN[$h]}
      ip link set lo up"
  done
  # veth pair: created in A, peer moved to B through a helper process living in B's netns
  nsenter --net=$NS/B.net sleep 30 &
  local helper=$!
  sleep 0.1
  nsenter --net=$NS/A.net ip link add ${VETH[A]} type veth peer name ${VETH[B]} netns $helper
  kill $helper 2>/dev/null || true; wait $helper 2>/dev/null || true
  for h in A B; do
    nsenter --net=$NS/$h.net ip addr add ${IP[$h]}/24 dev ${VETH[$h]}
    nsenter --net=$NS/$h.net ip link set ${VETH[$h]} up
  done
}

write_reaper() {
  # This machine's PID 1 reaps orphans only every 1-2 s and libvirt polls kill(pid,0)
  # after SIGTERM, so every QEMU exit would cost seconds. Run the daemons under a
  # child-subreaper that reaps at once (reference pitfall 9).
  cat > $FT/reaper.py <<'EOF2'
#!/usr/bin/python3
# reaper.py PIDFILE CMD... : become PR_SET_CHILD_SUBREAPER, run CMD, then reap every orphan
import ctypes, os, sys, time, signal
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
open(sys.argv[1], 'a').write('%d\n' % os.getpid())
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
if os.fork() == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
EOF2
  chmod 755 $FT/reaper.py
}

daemons_up() {
  local h i
  write_reaper
  for h in A B; do
    # -l: TCP listener without systemd socket activation; -p: pidfiles under the
    # private /run/libvirt (the defaults /run/*.pid would clash between hosts)
    inhost $h setsid /usr/bin/python3 $FT/reaper.py /run/libvirt/reaper.pids sh -c \
      "virtlogd -d -p /run/libvirt/virtlogd.pid; libvirtd -d -l -p /run/libvirt/libvirtd.pid" \
      </dev/null >/dev/null 2>&1 &
  done
  for h in A B; do
    for i in $(seq 1 150); do
      inhost $h virsh -c qemu:///system version >/dev/null 2>&1 && break
      sleep 0.2
    done
    inhost $h virsh -c qemu:///system version >/dev/null 2>&1 || { log "libvirtd on host $h did not come up"; return 1; }
  done
  for i in $(seq 1 50); do
    inhost A virsh -c qemu+tcp://${HN[B]}/system hostname >/dev/null 2>&1 \
      && inhost B virsh -c qemu+tcp://${HN[A]}/system hostname >/dev/null 2>&1 && break
    sleep 0.2
  done
  log "hosta -> qemu+tcp://hostb/system: $(inhost A virsh -c qemu+tcp://${HN[B]}/system hostname 2>&1)"
  log "hostb -> qemu+tcp://hosta/system: $(inhost B virsh -c qemu+tcp://${HN[A]}/system hostname 2>&1)"
}

# every process living in a network namespace this script made (daemons, QEMU, helpers)
ns_pids() { # ns_pids H
  local ino p
  [ -e $NS/$1.net ] || return 0
  ino=$(stat -L -c %i $NS/$1.net 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink $p/ns/net 2>/dev/null)" = "net:[$ino]" ] && echo ${p#/proc/}
  done
  return 0
}

down() {
  local h pid dom
  for h in A B; do
    if ns_alive $h; then
      for dom in $(inhost $h virsh -c qemu:///system list --name 2>/dev/null); do
        inhost $h timeout 20 virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
      done
      for pid in $(cat $FT/hosts/$h/run-libvirt/libvirtd.pid $FT/hosts/$h/run-libvirt/virtlogd.pid 2>/dev/null); do
        kill "$pid" 2>/dev/null || true
      done
    fi
  done
  sleep 0.5
  for h in A B; do
    for pid in $(cat $FT/hosts/$h/run-libvirt/reaper.pids 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    for pid in $(ns_pids $h); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for h in A B; do
    for pid in $(ns_pids $h); do kill -9 "$pid" 2>/dev/null || true; done
    for f in $NS/$h.mnt $NS/$h.uts $NS/$h.net; do umount "$f" 2>/dev/null || true; done
  done
  if mountpoint -q $NS 2>/dev/null; then umount $NS || umount -l $NS; fi
  if [ "${KEEP_LOGS:-0}" = 1 ] && [ -d $FT/hosts ]; then
    rm -rf $FT.logs; mkdir -p $FT.logs
    for h in A B; do cp -a $FT/hosts/$h/var-log-libvirt $FT.logs/$h 2>/dev/null || true; done
  fi
  rm -rf $FT
}

case "${1:-}" in
  up)
    check_prereqs
    down                 # leftovers of an earlier run (crashed test, ^C)
    mkdir -p $FT/shared; chmod 755 $FT $FT/shared
    # pmemsave dumps: the emulator writes them as its user, Debian's libvirt-qemu
    install -d -o libvirt-qemu -g libvirt-qemu -m 0755 $FT/shared/dumps
    make_tree A; make_tree B
    ns_up
    daemons_up
    log "up: $FT"
    ;;
  down) down ;;
  status)
    for h in A B; do
      echo "== host $h"; inhost $h sh -c 'hostname; ip -br addr; virsh -c qemu:///system list --all' || true
    done ;;
  sh)    h=$2; shift 2; inhost $h "$@" ;;
  virsh) h=$2; shift 2; inhost $h virsh -c qemu:///system "$@" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
