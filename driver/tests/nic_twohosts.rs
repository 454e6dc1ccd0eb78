//! A ferry-qemu domain with a virtio NIC on a bridge, between two real
//! libvirt hosts (tests/twohosts/): each host has a bridge `br-ferry` in its
//! network namespace, libvirt makes the guest's tap a port of it and passes
//! the tap's fd (`-netdev tap,fd=N,id=hostnet0` + `-device
//! virtio-net-pci,netdev=hostnet0,...,mac=...`). The dirtier (`net=1`) broadcasts a frame every pass and
//! answers pings; the test listens on each host's bridge with an `AF_PACKET`
//! socket opened in that host's namespace. Before a live migration the
//! guest's frames show on A's bridge and it answers pings there; after it
//! (`--p2p`) B's bridge gets the 5 RARP announcements of the guest's MAC, the
//! passes go on there and pings are answered, and A's bridge hears nothing
//! more from the guest. Then back to A (plain `virsh migrate`), the same.
//! A domain with `<interface type='user'>` is refused at start with ferry-qemu's
//! reason and fix.
//!
//! Skipped, with the reason printed, where the hosts cannot be brought up;
//! in CI (`CI` set) that is a failure.

mod twohosts;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_testguest::link::Link;
use twohosts::lab::{Lab, CMDLINE};
use twohosts::{text, DEST_A, DEST_B};

const BRIDGE: &str = "br-ferry";
const MAC: &str = "52:54:00:12:34:56";
/// QEMU announces a migrated NIC with this many RARP frames, and so does ferry.
const RARPS: usize = 5;

fn interface(kind: &str, source: &str) -> String {
    format!(
        "<devices>
    <interface type='{kind}'>
      <mac address='{MAC}'/>{source}
      <model type='virtio'/>
    </interface>"
    )
}

/// Sets the flag when dropped, also while a panic unwinds.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` while threads of their own read both links, so that neither
/// socket's buffer overflows while `f` blocks (a migration) and each frame
/// is seen when it comes.
fn watching<T>(a: &mut Link, b: &mut Link, f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for link in [a, b] {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    link.next_frame();
                }
            });
        }
        let _stop = SetOnDrop(&stop);
        f()
    })
}

/// Live-migrates `dom` from `from` to `to` (`dest`, with `extra` flags) while
/// listening on both bridges, and checks what each bridge hears: `to`'s the
/// guest's announcements, its passes going on and answers to `pings`;
/// `from`'s nothing more from the guest. Returns the wall time of `virsh
/// migrate`.
fn hop(
    lab: &Lab,
    dom: &str,
    (from, link_from): (&str, &mut Link),
    (to, link_to): (&str, &mut Link),
    dest: &str,
    extra: &[&str],
    pings: &[u64],
) -> Duration {
    // (The source side is never quiet while the guest runs there: reading
    // it all would not end. The watchers below catch up with it.)
    link_to.drain();
    link_from.rarps.clear();
    link_to.rarps.clear();
    let before_on_to = link_to.passes.last().copied();
    let (wall, returned) = watching(link_from, link_to, || {
        let wall = lab.migrate(from, dom, dest, extra);
        (wall, Instant::now())
    });
    // The source is gone: what it sent is in the socket or already read.
    link_from.drain();
    let last_on_from = *link_from
        .passes
        .last()
        .expect("passes on the source bridge");
    let serial = lab.serial_log(to, dom);
    link_to.wait_pass(last_on_from + 3, &serial);
    let deadline = Instant::now() + Duration::from_secs(10);
    while link_to.rarps.len() < RARPS && Instant::now() < deadline {
        link_to.next_frame();
    }
    let first_on_to = link_to
        .passes
        .range(before_on_to.map_or(0, |p| p + 1)..)
        .next()
        .copied()
        .expect("passes on the destination bridge");
    let rarps = &link_to.rarps;
    eprintln!(
        "{from} -> {to}: virsh migrate {extra:?} {wall:.1?}; last pass on {from}'s bridge \
         {last_on_from}, first on {to}'s {first_on_to}; {} RARP frames on {to}'s bridge, \
         spread over {:?}, the first {:?} before virsh returned",
        rarps.len(),
        rarps
            .last()
            .zip(rarps.first())
            .map(|(l, f)| l.duration_since(*f)),
        rarps
            .first()
            .map(|f| returned.saturating_duration_since(*f)),
    );
    assert_eq!(
        rarps.len(),
        RARPS,
        "RARP frames for {MAC} on host {to}'s bridge"
    );
    assert!(
        link_from.rarps.is_empty(),
        "the source announced the guest on host {from}'s bridge"
    );
    // Every pass's frame went out once, on one side or the other.
    assert_eq!(
        first_on_to,
        last_on_from + 1,
        "passes on {from}'s bridge end at {last_on_from}, on {to}'s they start at {first_on_to}"
    );
    link_to.ping(pings);
    // Long after the switch-over, still nothing from the guest on the source side.
    link_from.drain();
    assert_eq!(
        link_from.passes.last(),
        Some(&last_on_from),
        "host {from}'s bridge still hears the guest's passes after it moved to {to}"
    );
    wall
}

#[test]
fn virtio_nic_on_a_bridge_answers_is_announced_and_migrates_both_ways() {
    let Some(lab) = twohosts::lab::lab(1) else {
        return;
    };
    let t0 = Instant::now();
    let dom = "ferry-nic";
    let mib = 64;
    let (_br_a, _br_b) = (lab.hosts.bridge("A", BRIDGE), lab.hosts.bridge("B", BRIDGE));
    let mut link_a = Link::in_netns(&lab.hosts.netns("A"), BRIDGE);
    let mut link_b = Link::in_netns(&lab.hosts.netns("B"), BRIDGE);

    // No slirp in ferry: refused at start, with the fix.
    let user = "ferry-nic-user";
    let xml = lab
        .dirtier(user, mib, &format!("{CMDLINE} net=1"))
        .replacen("<devices>", &interface("user", ""), 1);
    lab.forget(user);
    lab.hosts.define("A", user, &xml);
    let out = lab.hosts.virsh("A", &["start", user]);
    let t = text(&out);
    eprintln!("virsh start with <interface type='user'>: {t}");
    assert!(
        !out.status.success()
            && t.contains(
                "-netdev: user-mode networking ('hostnet0') is not supported by ferry-qemu"
            )
            && t.contains(
                "use a bridge or tap interface (<interface type='bridge'|'network'|'ethernet'>)"
            ),
        "{t}\n{}",
        lab.diagnose(user)
    );
    lab.forget(user);

    let xml = lab.dirtier(dom, mib, &format!("{CMDLINE} net=1")).replacen(
        "<devices>",
        &interface("bridge", &format!("\n      <source bridge='{BRIDGE}'/>")),
        1,
    );
    lab.start("A", dom, &xml);
    eprintln!("{:.1?}: started", t0.elapsed());
    let log = std::fs::read_to_string(lab.hosts.log_dir("A").join(format!("qemu/{dom}.log")))
        .unwrap_or_default();
    let nic_args: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("-netdev") || l.contains("virtio-net"))
        .collect();
    eprintln!("libvirt's NIC arguments:\n{}", nic_args.join("\n"));
    assert!(
        nic_args
            .iter()
            // libvirt 9.0 writes JSON (`{"type":"tap","fd":"N",...}`) for an
            // emulator whose QMP schema has the netdev JSON feature, else this.
            .any(|l| l.contains("-netdev tap,fd=") || l.contains(r#""type":"tap","fd":""#))
            && nic_args
                .iter()
                .any(|l| l.contains("virtio-net-pci") && l.contains(MAC)),
        "{log}"
    );
    let serial = std::fs::read_to_string(lab.serial_log("A", dom)).unwrap_or_default();
    assert!(serial.contains(&format!("net: mac={MAC}")), "{serial}");
    let list = lab.virsh_ok("A", &["domiflist", dom]);
    eprintln!("virsh domiflist: {list}");
    assert!(
        list.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 5 && w[1..] == ["bridge", BRIDGE, "virtio", MAC]
        }),
        "{list}"
    );

    link_a.wait_pass(2, &lab.serial_log("A", dom));
    link_a.ping(&[0x11, 0x12, 0x13]);
    assert!(link_a.rarps.is_empty(), "RARP frames before any migration");

    let wall = hop(
        &lab,
        dom,
        ("A", &mut link_a),
        ("B", &mut link_b),
        DEST_B,
        &["--p2p"],
        &[0x21, 0x22, 0x23],
    );
    lab.assert_moved(dom, "A", "B", mib);
    let wall_back = hop(
        &lab,
        dom,
        ("B", &mut link_b),
        ("A", &mut link_a),
        DEST_A,
        &[],
        &[0x31, 0x32, 0x33],
    );
    lab.assert_moved(dom, "B", "A", mib);
    eprintln!(
        "virsh migrate A->B (p2p) {wall:.1?}, B->A {wall_back:.1?}; {:.1?} in all",
        t0.elapsed()
    );
    lab.forget(dom);
}
