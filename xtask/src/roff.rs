//! A small roff writer for the hand-written parts of the pages: escaping, a few
//! man(7) macros, inline `code` as bold, and markdown tables as tbl(1) tables.

/// Escapes text for roff: backslashes, hyphens (so that options copy-paste as
/// ASCII) and control characters at the start of a line.
pub fn esc(s: &str) -> String {
    let s = s.replace('\\', r"\e").replace('-', r"\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!(r"\&{s}")
    } else {
        s
    }
}

/// Escapes text and turns markdown `code` spans into bold.
pub fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(r"\fB");
            out.push_str(&esc(part).replace("\\&", ""));
            out.push_str(r"\fR");
        } else {
            out.push_str(&esc(part).replace("\\&", ""));
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, r"\&");
    }
    out
}

/// A page under construction.
#[derive(Debug, Default)]
pub struct Doc {
    out: String,
}

impl Doc {
    /// Starts a page with its `.TH` line.
    pub fn new(title: &str, section: &str, tbl: bool) -> Self {
        let mut out = String::new();
        if tbl {
            // Tells man(1) to run the page through tbl(1).
            out.push_str("'\\\" t\n");
        }
        out.push_str(&format!(
            ".TH {} {section} \"\" \"ferry {}\" \"ferry manual\"\n",
            title.to_uppercase(),
            env!("CARGO_PKG_VERSION")
        ));
        // No hyphenation: option and command names must stay whole.
        out.push_str(".nh\n");
        Doc { out }
    }

    /// Appends roff that is already escaped (e.g. from clap_mangen).
    pub fn raw(&mut self, roff: &str) -> &mut Self {
        self.out.push_str(roff);
        if !roff.ends_with('\n') {
            self.out.push('\n');
        }
        self
    }

    pub fn sh(&mut self, heading: &str) -> &mut Self {
        self.raw(&format!(".SH \"{}\"", heading.to_uppercase()))
    }

    pub fn ss(&mut self, heading: &str) -> &mut Self {
        self.raw(&format!(".SS \"{}\"", inline(heading)))
    }

    /// A paragraph of prose (markdown `code` spans become bold).
    pub fn p(&mut self, text: &str) -> &mut Self {
        self.raw(".PP");
        self.raw(&inline(text))
    }

    /// A tagged paragraph: `tag` in bold, then `text` indented.
    pub fn tp(&mut self, tag: &str, text: &str) -> &mut Self {
        self.raw(".TP");
        self.raw(&format!(r"\fB{}\fR", esc(tag)));
        self.raw(&inline(text))
    }

    /// A tagged paragraph whose tag is already roff.
    pub fn tp_raw(&mut self, tag: &str, text: &str) -> &mut Self {
        self.raw(".TP");
        self.raw(tag);
        self.raw(&inline(text))
    }

    /// An indented literal example.
    pub fn example(&mut self, lines: &[&str]) -> &mut Self {
        self.raw(".PP\n.RS 4\n.nf");
        for l in lines {
            self.raw(&format!(r"\&{}", esc(l)));
        }
        self.raw(".fi\n.RE")
    }

    /// A table: a header row, rows, and per column whether it is right-aligned.
    /// Columns with long cells (and the last column) are text blocks, which wrap.
    pub fn table(&mut self, header: &[String], rows: &[Vec<String>], right: &[bool]) -> &mut Self {
        let n = header.len();
        let all = || std::iter::once(header).chain(rows.iter().map(Vec::as_slice));
        let wraps: Vec<bool> = (0..n)
            .map(|i| i + 1 == n || all().any(|r| r.get(i).is_some_and(|c| shown(c) > 24)))
            .collect();
        // Widths in ens for the wrapping columns: what the fixed columns leave of
        // an 80-column terminal, borders and gaps included, shared by their longest cells.
        let longest = |i: usize| all().filter_map(|r| r.get(i)).map(|c| shown(c)).max();
        let fixed: usize = (0..n)
            .filter(|i| !wraps[*i])
            .map(|i| longest(i).unwrap_or(0) + 3)
            .sum();
        let room = 58usize.saturating_sub(fixed).max(23);
        let weights: Vec<usize> = (0..n)
            .map(|i| {
                if wraps[i] {
                    longest(i).unwrap_or(1).clamp(12, 60)
                } else {
                    0
                }
            })
            .collect();
        let total: usize = weights.iter().sum::<usize>().max(1);
        let width = |i: usize| {
            let longest = longest(i).unwrap_or(1);
            (room * weights[i] / total)
                .saturating_sub(3)
                .max(20)
                .min(longest + 1)
        };
        let spec = |bold: bool| -> String {
            (0..n)
                .map(|i| {
                    let a = if right.get(i).copied().unwrap_or(false) {
                        "r"
                    } else {
                        "l"
                    };
                    let f = if bold { "b" } else { "" };
                    if wraps[i] {
                        format!("{a}{f}w({}n)", width(i))
                    } else {
                        format!("{a}{f}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        self.raw(".PP\n.TS\nallbox tab(\t);");
        self.raw(&spec(true));
        self.raw(&format!("{}.", spec(false)));
        for row in all() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let c = inline(c);
                    if wraps[i] {
                        format!("T{{\n.ad l\n{c}\nT}}")
                    } else if c.is_empty() {
                        r"\&".to_string()
                    } else {
                        c
                    }
                })
                .collect();
            self.raw(&cells.join("\t"));
        }
        self.raw(".TE\n.sp")
    }

    /// Appends a markdown table (`| a | b |` rows, a `|---:|` alignment row).
    pub fn md_table(&mut self, lines: &[&str]) -> &mut Self {
        let rows: Vec<Vec<String>> = lines.iter().map(|l| md_cells(l)).collect();
        let (Some(header), Some(align)) = (rows.first(), rows.get(1)) else {
            return self;
        };
        let right: Vec<bool> = align.iter().map(|a| a.ends_with(':')).collect();
        self.table(header, &rows[2..], &right)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// How many characters `cell` takes on the terminal (code spans unquoted).
fn shown(cell: &str) -> usize {
    cell.chars().filter(|c| *c != '`').count()
}

/// The cells of one markdown table row; `\|` is a literal bar.
pub fn md_cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let line = line.strip_prefix('|').unwrap_or(line);
    let line = line.strip_suffix('|').unwrap_or(line);
    let mut cells = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                if let Some(last) = cells.last_mut() {
                    last.push('|');
                }
            }
            '|' => cells.push(String::new()),
            c => {
                if let Some(last) = cells.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(esc("--kernel"), r"\-\-kernel");
        assert_eq!(esc(".hidden"), r"\&.hidden");
        assert_eq!(esc(r"a\b"), r"a\eb");
        assert_eq!(inline("use `-m 1G` here"), r"use \fB\-m 1G\fR here");
    }

    #[test]
    fn markdown_cells() {
        assert_eq!(
            md_cells("| 0 | `gpa \\| flags` | x |"),
            ["0", "`gpa | flags`", "x"]
        );
        assert_eq!(md_cells("|-------:|----|"), ["-------:", "----"]);
    }
}
