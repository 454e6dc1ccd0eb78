//! Splits the monitor byte stream into top-level JSON values, like QEMU's
//! JSON streamer: no newline needed, garbage does not wedge the stream.

/// Largest accepted message (QEMU's token limit is larger; libvirt's biggest
/// requests are a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest accepted nesting.
pub const MAX_NESTING: usize = 1024;

/// What the splitter found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// One complete top-level value (not yet validated as JSON).
    Message(Vec<u8>),
    /// A message over [`MAX_MESSAGE`] or [`MAX_NESTING`]; its bytes are
    /// dropped up to the next newline.
    TooLarge,
    /// A closing bracket with nothing open.
    Unbalanced,
}

/// Incremental splitter; feed it bytes as they arrive.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    discarding: bool,
}

impl Splitter {
    pub fn new() -> Self {
        Self::default()
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
    }

    /// Consumes `bytes`; returns the pieces completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.discarding {
                if b == b'\n' {
                    self.discarding = false;
                }
                continue;
            }
            if self.buf.is_empty() && b.is_ascii_whitespace() {
                continue;
            }
            if self.depth == 0 && !self.in_string && !self.buf.is_empty() && is_delim(b) {
                // End of a top-level scalar (`42`, `true`, ...).
                out.push(Piece::Message(std::mem::take(&mut self.buf)));
                self.reset();
                if b.is_ascii_whitespace() {
                    continue;
                }
            }
            self.buf.push(b);
            if self.buf.len() > MAX_MESSAGE || self.depth > MAX_NESTING {
                out.push(Piece::TooLarge);
                self.reset();
                self.discarding = b != b'\n';
                continue;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        out.push(Piece::Message(std::mem::take(&mut self.buf)));
                        self.reset();
                    }
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    if self.depth == 0 {
                        out.push(Piece::Unbalanced);
                        self.reset();
                    } else {
                        self.depth -= 1;
                        if self.depth == 0 {
                            out.push(Piece::Message(std::mem::take(&mut self.buf)));
                            self.reset();
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }
}

fn is_delim(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'"' | b'}' | b']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pieces: Vec<Piece>) -> Vec<String> {
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Message(m) => String::from_utf8(m).expect("utf8"),
                Piece::TooLarge => "<too large>".into(),
                Piece::Unbalanced => "<unbalanced>".into(),
            })
            .collect()
    }

    #[test]
    fn splits_without_newlines_and_across_reads() {
        let mut s = Splitter::new();
        assert!(s.push(b"{\"execute\":\"a\"}{\"exec").len() == 1);
        assert_eq!(
            msgs(s.push(b"ute\":\"b}{\"}\r\n")),
            vec!["{\"execute\":\"b}{\"}"]
        );
    }

    #[test]
    fn scalars_and_garbage() {
        let mut s = Splitter::new();
        assert_eq!(
            msgs(s.push(b"42 \"x\" ] {}")),
            vec!["42", "\"x\"", "<unbalanced>", "{}"]
        );
    }

    #[test]
    fn too_large_is_dropped_to_newline() {
        let mut s = Splitter::new();
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE + 10));
        big.extend_from_slice(b"\"}\n{\"ok\":1}");
        assert_eq!(msgs(s.push(&big)), vec!["<too large>", "{\"ok\":1}"]);
        let deep = "[".repeat(MAX_NESTING + 2);
        assert_eq!(msgs(s.push(deep.as_bytes())), vec!["<too large>"]);
    }
}
