//! Facts about the host that only libc can tell.

/// The host's offset from UTC, in seconds east, at `unix_secs` (the local
/// time zone's `tm_gmtoff`, daylight saving included): what a guest clock
/// set to local time (QEMU's `-rtc base=localtime`) is ahead of UTC.
/// `None` where libc cannot convert the time.
pub fn utc_offset_secs(unix_secs: i64) -> Option<i64> {
    let t: libc::time_t = unix_secs;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct (its
    // `tm_zone` pointer is null, which nothing here reads).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `t` and `tm` are live locals for the whole call; localtime_r
    // writes only into `tm` and is thread-safe, unlike localtime.
    let out = unsafe { libc::localtime_r(&t, &mut tm) };
    if out.is_null() {
        None
    } else {
        Some(tm.tm_gmtoff)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_offset_is_less_than_a_day() {
        let off = super::utc_offset_secs(1_700_000_000).expect("an offset");
        assert!(off.abs() < 86_400, "{off}");
    }
}
