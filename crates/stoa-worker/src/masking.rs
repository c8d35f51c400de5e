//! Masking of the org's secret values in a run's output, before anything is stored.
//!
//! Output arrives as pieces: whole lines, or pieces of at most 64 KiB of a longer line.
//! A secret cut in two by a piece boundary would slip past a per-piece replace, so the
//! end of a piece that does not end its line is held back (per stream and compose
//! service) until the next piece of that stream, or the end of the run, joins it.
//!
//! Invariant: no occurrence of a secret ever straddles the boundary between text that
//! is handed out and text that is held back, so masking each handed-out piece on its
//! own masks every occurrence.

use stoa_core::plane::{OutputPiece, OutputStream};

/// What replaces a secret value.
const MASK: &str = "***";

/// The secret values of a run, and the held-back ends of its unfinished lines.
#[derive(Debug, Default)]
pub struct Masker {
    /// Values to replace, longest first (so that a value containing another one is
    /// replaced whole).
    values: Vec<String>,
    /// Held-back text of each stream (and service) whose last piece did not end a
    /// line, without the `service | ` prefix.
    held: Vec<OutputPiece>,
}

impl Masker {
    /// Masks these values (those of at least `min_len` bytes, and at least one).
    pub fn new(values: impl Iterator<Item = String>, min_len: usize) -> Self {
        let mut values: Vec<String> = values.filter(|v| v.len() >= min_len.max(1)).collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Masker {
            values,
            held: Vec::new(),
        }
    }

    /// `text` with every value replaced by `***`.
    pub fn mask(&self, text: &mut String) {
        for v in &self.values {
            if text.contains(v.as_str()) {
                *text = text.replace(v.as_str(), MASK);
            }
        }
    }

    /// Joins a piece to what is held of its stream and holds back the end of the
    /// result when it does not end a line. Returns what can be written now (not yet
    /// masked), if anything.
    pub fn hold_back(&mut self, mut p: OutputPiece) -> Option<OutputPiece> {
        let held = self
            .held
            .iter()
            .position(|h| h.stream == p.stream && h.service == p.service);
        let longest = self.values.first().map_or(0, String::len);
        // Stoa's own lines are whole; without a value of two bytes or more, no value
        // can be cut in two.
        if p.stream == OutputStream::System
            || (held.is_none() && (longest < 2 || p.content.ends_with('\n')))
        {
            return Some(p);
        }
        // Every piece of a compose service's line starts with `service | `.
        let prefix = p
            .service
            .as_deref()
            .map(|s| format!("{s} | "))
            .unwrap_or_default();
        let body = p.content.strip_prefix(&prefix).unwrap_or(&p.content);
        let mut text = held
            .map(|i| self.held.swap_remove(i).content)
            .unwrap_or_default();
        text.push_str(body);
        if !text.ends_with('\n') {
            let rest = text.split_off(safe_cut(&text, &self.values, longest));
            if !rest.is_empty() {
                self.held.push(OutputPiece {
                    stream: p.stream,
                    service: p.service.clone(),
                    content: rest,
                });
            }
        }
        if text.is_empty() {
            return None;
        }
        p.content = prefix + &text;
        Some(p)
    }

    /// Everything held back (the streams ended without ending their lines), not yet
    /// masked.
    pub fn take_held(&mut self) -> Vec<OutputPiece> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|mut p| {
                if let Some(s) = &p.service {
                    p.content = format!("{s} | {}", p.content);
                }
                p
            })
            .collect()
    }
}

/// Where to cut `text`, which does not end its line: before its last `longest - 1`
/// bytes (where a value that goes on in the next piece would start), moved back to a
/// character boundary and before any value that the cut would split.
fn safe_cut(text: &str, values: &[String], longest: usize) -> usize {
    let mut cut = text.len().saturating_sub(longest.saturating_sub(1));
    loop {
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        // The first occurrence of each value that starts less than its length before
        // the cut; one that starts before the cut crosses it. A match of valid UTF-8
        // starts on a character boundary.
        let crossing = values
            .iter()
            .filter_map(|v| {
                let from = cut.saturating_sub(v.len() - 1);
                text.as_bytes()[from..]
                    .windows(v.len())
                    .position(|w| w == v.as_bytes())
                    .map(|i| from + i)
                    .filter(|&start| start < cut)
            })
            .min();
        match crossing {
            // Moving back can only put the cut inside an earlier occurrence; the loop
            // ends since the cut only decreases.
            Some(start) => cut = start,
            None => return cut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-välue";

    fn piece(stream: OutputStream, service: Option<&str>, text: &str) -> OutputPiece {
        OutputPiece {
            stream,
            service: service.map(str::to_string),
            content: match service {
                Some(s) => format!("{s} | {text}"),
                None => text.to_string(),
            },
        }
    }

    /// Feeds pieces through a masker; returns the masked text written, in order.
    fn run(m: &mut Masker, pieces: Vec<OutputPiece>) -> Vec<OutputPiece> {
        let mut out: Vec<OutputPiece> = pieces.into_iter().filter_map(|p| m.hold_back(p)).collect();
        out.extend(m.take_held());
        for p in &mut out {
            m.mask(&mut p.content);
        }
        out
    }

    fn text(out: &[OutputPiece]) -> String {
        out.iter().map(|p| p.content.as_str()).collect()
    }

    fn masker() -> Masker {
        Masker::new(
            [SECRET.to_string(), "other".into(), "ab".into(), "x".into()].into_iter(),
            2,
        )
    }

    #[test]
    fn a_secret_cut_at_any_byte_is_masked() {
        let line = format!("before {SECRET} after {SECRET}");
        for at in 0..=line.len() {
            if !line.is_char_boundary(at) {
                continue;
            }
            let mut m = masker();
            let (a, b) = line.split_at(at);
            let out = run(
                &mut m,
                vec![
                    piece(OutputStream::Stdout, None, a),
                    piece(OutputStream::Stdout, None, b),
                    piece(OutputStream::Stdout, None, "\n"),
                ],
            );
            assert_eq!(text(&out), "before *** after ***\n", "cut at {at}");
        }
    }

    #[test]
    fn pieces_of_three_and_streams_apart() {
        let mut m = masker();
        let s = SECRET;
        let out = run(
            &mut m,
            vec![
                piece(OutputStream::Stdout, None, &format!("aaaa{}", &s[..3])),
                // Another stream in between does not join the held text.
                piece(OutputStream::Stderr, None, "err line\n"),
                piece(OutputStream::Stdout, None, &s[3..6]),
                piece(OutputStream::Stdout, None, &format!("{} end", &s[6..])),
            ],
        );
        assert_eq!(text(&out), "err line\naaaa*** end");
        assert!(out.iter().all(|p| !p.content.is_empty()));
    }

    #[test]
    fn compose_services_keep_their_prefix_and_their_own_held_text() {
        let mut m = masker();
        let out = run(
            &mut m,
            vec![
                piece(
                    OutputStream::Stdout,
                    Some("web"),
                    &format!("x{}", &SECRET[..4]),
                ),
                piece(
                    OutputStream::Stdout,
                    Some("db"),
                    &format!("y{}", &SECRET[..2]),
                ),
                piece(
                    OutputStream::Stdout,
                    Some("web"),
                    &format!("{}\n", &SECRET[4..]),
                ),
                piece(
                    OutputStream::Stdout,
                    Some("db"),
                    &format!("{}\n", &SECRET[2..]),
                ),
            ],
        );
        let all = text(&out);
        assert!(!all.contains("s3") && !all.contains("välue"), "{all}");
        let web: String = out
            .iter()
            .filter(|p| p.service.as_deref() == Some("web"))
            .map(|p| p.content.strip_prefix("web | ").expect("prefixed"))
            .collect();
        assert_eq!(web, "x***\n");
    }

    #[test]
    fn whole_lines_pass_untouched_and_nothing_is_held_without_values() {
        let mut m = masker();
        let p = piece(OutputStream::Stdout, None, "hello other\n");
        assert_eq!(m.hold_back(p.clone()), Some(p));
        let mut none = Masker::new(std::iter::empty(), 3);
        let p = piece(OutputStream::Stdout, None, "no newline");
        assert_eq!(none.hold_back(p.clone()), Some(p));
        assert!(none.take_held().is_empty());
    }

    #[test]
    fn short_values_are_not_masked_and_duplicates_go() {
        let m = Masker::new(
            ["ab".into(), "cd".into(), "ab".into(), "x".into()].into_iter(),
            2,
        );
        assert_eq!(m.values, ["ab", "cd"]);
    }
}
