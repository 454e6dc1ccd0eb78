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
    /// A closing bracket with nothing open; input is dropped up to the next
    /// newline.
    Unbalanced,
    /// A byte that cannot appear outside a JSON string; input is dropped up
    /// to the next newline.
    Stray(u8),
    /// A raw control character (a newline, say) inside a string, where JSON
    /// allows none; input is dropped up to the next newline.
    ControlInString(u8),
}

/// Incremental splitter; feed it bytes as they arrive.
///
/// After an error the rest of the line is dropped and splitting starts
/// afresh after the next newline (QEMU's JSON lexer recovers at line
/// ends and structural characters; ferry at line ends only, so that one
/// line of garbage gets one error). The caller does the same with
/// [`Self::resync`] for a message that is not valid JSON.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    discarding: bool,
    /// Bytes fed and not yet split, from `pos` on.
    input: Vec<u8>,
    pos: usize,
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

    /// Drops the message being split and the rest of its line.
    pub fn resync(&mut self) {
        self.reset();
        self.discarding = true;
    }

    /// An error at byte `b`: drop the rest of the line (`b` may end it).
    fn fail(&mut self, b: u8, piece: Piece) -> Option<Piece> {
        self.reset();
        self.discarding = b != b'\n';
        Some(piece)
    }

    /// Adds `bytes` to the input; take the pieces with [`Self::next_piece`].
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// The next piece completed by the input fed so far.
    pub fn next_piece(&mut self) -> Option<Piece> {
        while let Some(&b) = self.input.get(self.pos) {
            if self.discarding {
                self.pos += 1;
                if b == b'\n' {
                    self.discarding = false;
                }
                continue;
            }
            if self.buf.is_empty() && b.is_ascii_whitespace() {
                self.pos += 1;
                continue;
            }
            if self.depth == 0 && !self.in_string && !self.buf.is_empty() && is_delim(b) {
                // End of a top-level scalar (`42`, `true`, ...); `b` is
                // split next.
                let msg = std::mem::take(&mut self.buf);
                self.reset();
                return Some(Piece::Message(msg));
            }
            self.pos += 1;
            if let Some(p) = self.step(b) {
                return Some(p);
            }
        }
        None
    }

    fn step(&mut self, b: u8) -> Option<Piece> {
        if self.in_string && !self.escape && b < 0x20 {
            return self.fail(b, Piece::ControlInString(b));
        }
        if !self.in_string && !is_json_byte(b) {
            return self.fail(b, Piece::Stray(b));
        }
        self.buf.push(b);
        if self.buf.len() > MAX_MESSAGE || self.depth > MAX_NESTING {
            return self.fail(b, Piece::TooLarge);
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    let msg = std::mem::take(&mut self.buf);
                    self.reset();
                    return Some(Piece::Message(msg));
                }
            }
            return None;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                if self.depth == 0 {
                    return self.fail(b, Piece::Unbalanced);
                }
                self.depth -= 1;
                if self.depth == 0 {
                    let msg = std::mem::take(&mut self.buf);
                    self.reset();
                    return Some(Piece::Message(msg));
                }
            }
            _ => {}
        }
        None
    }

    /// Consumes `bytes`; returns the pieces completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.feed(bytes);
        std::iter::from_fn(|| self.next_piece()).collect()
    }
}

fn is_delim(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'"' | b'}' | b']')
}

/// Whether `b` may appear in JSON outside a string: whitespace, structure,
/// numbers and the letters of `true`, `false` and `null`.
fn is_json_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n') || b"{}[],:\"0123456789+-.eEtrufalsn".contains(&b)
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
                Piece::Stray(b) => format!("<stray {b:#04x}>"),
                Piece::ControlInString(b) => format!("<control {b:#04x}>"),
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
            msgs(s.push(b"42 \"x\" ] {}\n{}")),
            vec!["42", "\"x\"", "<unbalanced>", "{}"]
        );
    }

    #[test]
    fn errors_drop_the_rest_of_the_line() {
        let mut s = Splitter::new();
        // A stray quote used to swallow every later command.
        assert_eq!(
            msgs(s.push(b"\"oops\n{\"execute\":\"a\"}\n")),
            vec!["<control 0x0a>", "{\"execute\":\"a\"}"]
        );
        assert_eq!(
            msgs(s.push(b"{\"a\": \x01 {\"b\":1}\n{\"c\":2}")),
            vec!["<stray 0x01>", "{\"c\":2}"]
        );
        // The caller's resync after an invalid message does the same.
        assert_eq!(msgs(s.push(b"nul")), Vec::<String>::new());
        assert_eq!(s.next_piece(), None);
        s.feed(b"l2 {\"d\":3}\n{\"e\":4}");
        assert_eq!(s.next_piece(), Some(Piece::Message(b"null2".to_vec())));
        s.resync();
        assert_eq!(
            msgs(std::iter::from_fn(|| s.next_piece()).collect()),
            vec!["{\"e\":4}"]
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
