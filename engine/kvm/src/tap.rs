//! The TUN/TAP ioctls a virtio-net device needs (linux/if_tun.h): open a tap by
//! name, ask whether an fd (ours or passed by libvirt) has IFF_VNET_HDR, and set
//! its virtio-net header size and offloads. libc has no safe wrappers for them.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// TUNSETIFF = _IOW('T', 202, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// TUNGETIFF = _IOR('T', 210, unsigned int).
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// TUNSETOFFLOAD = _IOW('T', 208, unsigned int).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// TUNSETVNETHDRSZ = _IOW('T', 216, int).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Interface flags (linux/if_tun.h).
pub const IFF_TAP: u16 = 0x0002;
pub const IFF_NO_PI: u16 = 0x1000;
pub const IFF_VNET_HDR: u16 = 0x4000;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name, then the flags in
/// the union (padded to the union's 24 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` and attaches it to tap `ifname` (created if absent and
/// this process may) with `IFF_TAP | IFF_NO_PI`, and `IFF_VNET_HDR` if `vnet_hdr`.
pub fn open_tap(ifname: &str, vnet_hdr: bool) -> io::Result<OwnedFd> {
    let name = CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {ifname:?} must be 1 to 15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
        ..Default::default()
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`; `req` is a
    // properly sized, initialized `#[repr(C)]` ifreq that outlives the call, and
    // the fd is the tun device just opened.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// The tap's interface flags (TUNGETIFF): e.g. whether it has [`IFF_VNET_HDR`].
pub fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<u16> {
    let mut req = IfReq::default();
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which is a valid,
    // exclusively borrowed `#[repr(C)]` ifreq of the kernel's size.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.flags)
}

/// Sets the size of the virtio-net header the tap reads and writes in front of
/// each frame (TUNSETVNETHDRSZ; only meaningful with IFF_VNET_HDR).
pub fn tun_set_vnet_hdr_sz(fd: BorrowedFd<'_>, size: i32) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points to
    // `size` on this stack frame for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size as *const i32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the offloads the tap may hand us (TUNSETOFFLOAD, TUN_F_* bits); 0 means
/// none: every frame arrives complete, with a zero header.
pub fn tun_set_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no
    // memory is passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A raw AF_PACKET socket bound to interface `ifname` (all ethertypes): the host
/// side of a tap, for tests and diagnostics. Frames written to it leave through
/// the interface (so a tap's reader gets them); frames the tap's writer sends
/// arrive on it.
pub fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let name = CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: if_nametoindex reads the NUL-terminated string `name`, alive for
    // the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from `addr`, a valid
    // sockaddr_ll on this stack frame, for the duration of the call.
    let r = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_tap_opened_by_name_has_a_vnet_header() {
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun");
            return;
        }
        let fd = match open_tap("ferrytk0", true) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("skipped: cannot create a tap here: {e}");
                return;
            }
        };
        let flags = tun_get_iff(fd.as_fd()).expect("TUNGETIFF");
        assert_eq!(
            flags & (IFF_TAP | IFF_VNET_HDR | IFF_NO_PI),
            IFF_TAP | IFF_VNET_HDR | IFF_NO_PI
        );
        tun_set_vnet_hdr_sz(fd.as_fd(), 12).expect("TUNSETVNETHDRSZ");
        tun_set_offload(fd.as_fd(), 0).expect("TUNSETOFFLOAD");
        assert!(open_tap("a-name-that-is-far-too-long", true).is_err());
    }
}
