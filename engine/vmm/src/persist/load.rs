//! Reading a VM: the offer (preamble and Shape), the VM built from it, the main
//! stream's RAM and state sections, the digest check and the state applied.
//! Checkpoint restore reads a whole stream with these; a migration's destination
//! reads its main connection with them, and adds what only migration has (the
//! return path, extra page streams).

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_format::{FormatError, Limits, PageSink, SectionId, StreamReader, PAGE_SIZE};
use ferry_kvm::{GuestRam, MemoryError};

use super::{check_inside, check_shape, ram_digest, Handshake, RestoreOptions};
use crate::cpu::VcpuState;
use crate::vm::{DevicesState, Vm, VmState};
use crate::VmmError;

/// Why a stream was refused while it was read (before its VM ever ran).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The stream could not be read or framed.
    #[error("the migration stream broke: {0}")]
    Read(#[from] FormatError),
    #[error("the stream starts with section {0}, not the VM shape: it is not a ferry VM stream")]
    NotVmStream(SectionId),
    #[error("the stream's VM shape is invalid: {0}")]
    InvalidShape(String),
    #[error("the handshake proposes {0} page streams without a session token")]
    NoSession(u32),
    #[error(
        "the stream carries a page at guest address {gpa:#x}, outside this VM's RAM {ranges:x?}"
    )]
    PageOutside { gpa: u64, ranges: Vec<(u64, u64)> },
    /// A page of a migration's stripes arrived on another stream than its own.
    #[error(
        "the page at guest address {gpa:#x} arrived on stream {index}, but belongs to stream \
         {owner}"
    )]
    WrongStream { gpa: u64, index: u32, owner: u32 },
    #[error("cannot write the page at guest address {gpa:#x}: {source}")]
    WritePage {
        gpa: u64,
        #[source]
        source: MemoryError,
    },
    #[error("the stream carries a second {0} section")]
    Twice(SectionId),
    #[error("unexpected section {0} in a VM stream")]
    Unexpected(SectionId),
    #[error("the stream ended without the {0} section: the sender was interrupted or is broken")]
    Missing(&'static str),
    #[error("cannot compute the digest of guest RAM: {0}")]
    Digest(#[source] MemoryError),
    #[error(
        "guest RAM differs from the source in MiB {mib} of RAM (digest mismatch): the \
         migration is aborted and the source keeps running"
    )]
    DigestMismatch { mib: usize },
    #[error("the RAM digest has the wrong length")]
    DigestLength,
}

/// Reads the preamble and the Shape of a stream and checks the shape against
/// `opts` (this side's configuration): nothing is built yet.
pub fn read_offer<R: Read>(
    reader: R,
    opts: &RestoreOptions,
) -> Result<(StreamReader<BufReader<R>>, Handshake), VmmError> {
    let limits = Limits::default();
    let (mut reader, _preamble) =
        StreamReader::new(BufReader::with_capacity(1 << 20, reader), limits)
            .map_err(LoadError::Read)?;
    let mut buf = Vec::new();
    let header = reader.next_section(&mut buf).map_err(LoadError::Read)?;
    if header.id != SectionId::Shape {
        return Err(LoadError::NotVmStream(header.id).into());
    }
    let hs: Handshake =
        ferry_format::decode_cbor(SectionId::Shape, &buf, &limits).map_err(LoadError::Read)?;
    check_shape(&hs.shape, opts)?;
    let proposed = hs.streams.max(1);
    if proposed > 1 && hs.session == 0 {
        return Err(LoadError::NoSession(proposed).into());
    }
    Ok((reader, hs))
}

/// Builds the VM of an accepted handshake: this side's devices must be the
/// stream's, and this host must run the guest's CPU.
pub fn build(hs: &Handshake, opts: &RestoreOptions) -> Result<Vm, VmmError> {
    Vm::create_for_shape(
        &hs.shape,
        crate::vm::HostDevices {
            backing: opts.backing,
            serial: opts.serial.clone(),
            virtio: opts.virtio.clone(),
            ide: opts.ide.clone(),
            fw_cfg: opts.fw_cfg.clone(),
            firmware: opts.firmware.clone(),
            rtc: opts.rtc.clone(),
        },
    )
}

/// The sections of the main stream besides RAM.
#[derive(Debug, Default)]
pub(crate) struct MainSections {
    vcpus: Option<Vec<VcpuState>>,
    vm_state: Option<VmState>,
    devices: Option<DevicesState>,
    digest: Option<Vec<u32>>,
    /// The switch to post-copy: the pages still to come, per RAM range.
    pub postcopy: Option<Vec<Vec<u64>>>,
}

impl MainSections {
    /// Post-copy, and every state section is here: the VM can run.
    fn ready_for_postcopy(&self) -> bool {
        self.postcopy.is_some()
            && self.vcpus.is_some()
            && self.vm_state.is_some()
            && self.devices.is_some()
    }
}

/// Reads the main stream to its End: its pages go to `sink`; the state and the
/// digest are returned. After a Postcopy section it returns as soon as the state
/// is complete, the rest of RAM still on the stream.
pub(crate) fn read_main<R: BufRead, S: PageSink>(
    reader: &mut StreamReader<R>,
    buf: &mut Vec<u8>,
    sink: &mut S,
    limits: &Limits,
) -> Result<MainSections, S::Error>
where
    S::Error: From<LoadError>,
{
    // Each state section comes once: a stream with two (of which one would
    // silently win) is refused.
    fn once<T: serde::de::DeserializeOwned, E: From<LoadError> + From<FormatError>>(
        slot: &mut Option<T>,
        id: SectionId,
        buf: &[u8],
        limits: &Limits,
    ) -> Result<(), E> {
        if slot.is_some() {
            return Err(LoadError::Twice(id).into());
        }
        *slot = Some(ferry_format::decode_cbor(id, buf, limits)?);
        Ok(())
    }
    let mut m = MainSections::default();
    loop {
        let header = reader.next_section_into(buf, sink)?;
        match header.id {
            SectionId::RamPages => {}
            SectionId::Vcpus => once(&mut m.vcpus, header.id, buf, limits)?,
            SectionId::Vm => once(&mut m.vm_state, header.id, buf, limits)?,
            SectionId::Devices => once(&mut m.devices, header.id, buf, limits)?,
            SectionId::Digest => once(&mut m.digest, header.id, buf, limits)?,
            SectionId::Postcopy => once(&mut m.postcopy, header.id, buf, limits)?,
            SectionId::End => return Ok(m),
            other => return Err(LoadError::Unexpected(other).into()),
        }
        if m.ready_for_postcopy() {
            return Ok(m);
        }
    }
}

/// Loads what the main stream carried into `vm` (which never ran): checks the
/// RAM digest when the handshake announced one, applies the state, and resumes
/// the VM with `opts.autostart`.
pub(crate) fn finish(
    mut vm: Vm,
    sections: MainSections,
    hs: &Handshake,
    opts: &RestoreOptions,
) -> Result<Vm, VmmError> {
    let MainSections {
        vcpus,
        vm_state,
        devices,
        digest,
        postcopy: _,
    } = sections;
    let vcpus = vcpus.ok_or(LoadError::Missing("vCPU"))?;
    let vm_state = vm_state.ok_or(LoadError::Missing("VM state"))?;
    let devices = devices.ok_or(LoadError::Missing("device"))?;
    if hs.digest {
        let want = digest.ok_or(LoadError::Missing("RAM digest"))?;
        let have = ram_digest(vm.ram()).map_err(LoadError::Digest)?;
        if let Some(mib) = want.iter().zip(&have).position(|(a, b)| a != b) {
            return Err(LoadError::DigestMismatch { mib }.into());
        }
        if want.len() != have.len() {
            return Err(LoadError::DigestLength.into());
        }
    }
    // Loading takes the disks' image locks; a failure from here lets go of
    // them before the sender hears of it (and resumes, taking them back).
    let loaded = vm.restore_state(vcpus, &vm_state, &devices).and_then(|()| {
        if opts.autostart {
            vm.resume()
        } else {
            Ok(())
        }
    });
    if let Err(e) = loaded {
        if let Err(u) = vm.deactivate_disks() {
            tracing::warn!("{u}");
        }
        return Err(e);
    }
    Ok(vm)
}

/// Writes one page of a stream into guest RAM: its data, or zeroes for a zero
/// page. RAM nothing wrote yet reads as zero: a zero page leaves it untouched
/// (no fault, no zeroing); a page an earlier pass filled is zeroed.
pub(crate) fn write_page(ram: &GuestRam, gpa: u64, data: Option<&[u8]>) -> Result<(), MemoryError> {
    match data {
        Some(data) => ram.write(gpa, data),
        None if ram.is_zero_page(gpa)? => Ok(()),
        None => ram.write(gpa, &[0u8; PAGE_SIZE]),
    }
}

/// Writes the pages of a stream straight into guest RAM, as the reader takes
/// them from its buffer; each batch is checked whole first (every page inside
/// RAM).
struct RamSink<'a> {
    ram: &'a GuestRam,
    ranges: Vec<(u64, u64)>,
    frontier: &'a Frontier,
}

impl PageSink for RamSink<'_> {
    type Error = LoadError;

    fn check(&mut self, gpas: &[u64]) -> Result<(), LoadError> {
        gpas.iter()
            .try_for_each(|&gpa| check_inside(&self.ranges, gpa))
    }

    fn page(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), LoadError> {
        if data.is_some() {
            self.frontier.advance(gpa);
        }
        write_page(self.ram, gpa, data).map_err(|source| LoadError::WritePage { gpa, source })
    }
}

/// The highest guest address a page arrived for, over all streams (+1 page; 0
/// before the first).
#[derive(Debug, Default)]
pub(crate) struct Frontier(AtomicU64);

impl Frontier {
    /// Records that the page at `gpa` arrived.
    pub(crate) fn advance(&self, gpa: u64) {
        self.0.fetch_max(gpa + PAGE_SIZE as u64, Ordering::Release);
    }
}

/// How far ahead of the [`Frontier`] [`prefault`] backs guest RAM.
const PREFAULT_WINDOW: u64 = 16 << 20;
/// The step it backs RAM in: a transparent huge page.
const PREFAULT_STEP: u64 = 2 << 20;

/// Backs guest RAM with memory just ahead of where the pages arrive, on its
/// own thread, until `stop`: the kernel's zeroing of fresh memory (three
/// quarters of a receiver's time where RAM is first touched) then runs beside
/// the copying instead of inside it. A first pass sends pages in address order,
/// so the window ahead of the highest page written is what comes next; where
/// the source skips zero pages the window may back up to PREFAULT_WINDOW of RAM
/// the guest never used, per such gap.
pub(crate) fn prefault(ram: &GuestRam, frontier: &Frontier, stop: &AtomicBool) {
    let ranges = ram.ranges();
    let mut done = 0u64;
    while !stop.load(Ordering::Acquire) {
        let front = frontier.0.load(Ordering::Acquire);
        let want = front.saturating_add(PREFAULT_WINDOW);
        let from = done.max(front - front % PREFAULT_STEP);
        if front == 0 || from >= want {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        // The next step inside RAM at or after `from`, below `want`.
        let step = ranges.iter().find_map(|&(base, size)| {
            let at = from.max(base);
            (at < base + size && at < want).then(|| (at, PREFAULT_STEP.min(base + size - at)))
        });
        let Some((at, len)) = step else {
            // Past the end of RAM: nothing more to do.
            if ranges.iter().all(|&(b, s)| from >= b + s) {
                return;
            }
            std::thread::sleep(Duration::from_micros(500));
            continue;
        };
        if let Err(e) = ram.populate(at, len as usize) {
            tracing::debug!("stopped backing guest RAM ahead of the stream: {e}");
            return;
        }
        done = at + len;
    }
}

/// Reads a whole checkpoint (or any one-stream ferry stream) and returns the
/// VM: paused and ready to resume, or running with `opts.autostart`.
pub fn restore<R: Read>(r: R, opts: &RestoreOptions) -> Result<Vm, VmmError> {
    let (mut reader, hs) = read_offer(r, opts)?;
    let vm = build(&hs, opts)?;
    let limits = Limits::default();
    let frontier = Frontier::default();
    let stop = AtomicBool::new(false);
    let ram = vm.ram();
    let sections = std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("restore-prefault".into())
            .spawn_scoped(scope, || prefault(ram, &frontier, &stop));
        if let Err(e) = spawned {
            tracing::warn!("no thread to back guest RAM ahead of the stream: {e}");
        }
        let mut sink = RamSink {
            ram,
            ranges: ram.ranges(),
            frontier: &frontier,
        };
        let result = read_main(&mut reader, &mut Vec::new(), &mut sink, &limits);
        stop.store(true, Ordering::Release);
        result
    })?;
    if sections.postcopy.is_some() {
        // Only a live migration switches to post-copy.
        return Err(LoadError::Unexpected(SectionId::Postcopy).into());
    }
    finish(vm, sections, &hs, opts)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ferry_kvm::Backing;

    use super::*;

    /// Resident KiB of the mapping that contains `addr`, from /proc/self/smaps.
    fn resident_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(kib) = line.strip_prefix("Rss:") {
                    return kib.trim().trim_end_matches(" kB").parse().expect("Rss");
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    /// A receiver backs RAM just ahead of where pages arrive, not the
    /// guest's whole RAM (a guest's unused memory stays unbacked), and never
    /// changes what RAM holds.
    #[test]
    fn prefault_backs_the_window_ahead_of_the_pages_only() {
        let ram = GuestRam::new(&[(0, 256 << 20)], Backing::Anonymous).expect("RAM");
        use vm_memory::GuestMemoryBackend;
        let host = ram.memory().iter().next().expect("a region").as_ptr() as usize;
        ram.write(8 << 20, &[0x5a; 4096]).expect("write");
        let before = resident_kib(host);
        let frontier = Frontier::default();
        frontier.advance(8 << 20);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| prefault(&ram, &frontier, &stop));
            // Done once the window is backed: it then only waits.
            let deadline = Instant::now() + Duration::from_secs(30);
            while resident_kib(host) < before + (PREFAULT_WINDOW >> 10) - 4096 {
                assert!(Instant::now() < deadline, "the window was never backed");
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Release);
            t.join().expect("prefault thread");
        });
        let after = resident_kib(host);
        let most = ((8 << 20) + PREFAULT_WINDOW + PREFAULT_STEP) >> 10;
        assert!(
            after <= most,
            "{after} KiB resident, at most {most} expected"
        );
        let mut page = [0u8; 4096];
        ram.read(8 << 20, &mut page).expect("read");
        assert_eq!(page, [0x5a; 4096]);
    }
}
