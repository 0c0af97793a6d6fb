//! Text that came from a peer (an agent, a guest's file system) on its way to a terminal, a log
//! or the catalog: [`cap`] bounds what is stored, [`escape`] makes control characters visible so
//! a name cannot move the cursor, recolour a terminal or forge a log line. JSON output needs
//! neither (serde escapes control characters itself).

use std::borrow::Cow;
use std::fmt;

/// The most bytes of a failure reason or note from an agent the coordinator keeps.
pub const MAX_REASON_BYTES: usize = 4096;
/// The most bytes of a software version string a peer reports.
pub const MAX_VERSION_BYTES: usize = 128;

/// `text` cut to at most `max` bytes on a character boundary, with a marker saying how much was
/// dropped; the result (marker included) is never longer than `max` (unless `max` is smaller
/// than the marker itself).
pub fn cap(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = |dropped: usize| format!("… [{dropped} bytes truncated]");
    // The marker's length depends on the number it carries: size it for the largest drop.
    let room = max.saturating_sub(marker(text.len()).len());
    let mut end = room.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(max);
    out.push_str(&text[..end]);
    out.push_str(&marker(text.len() - end));
    out
}

/// [`cap`] at [`MAX_REASON_BYTES`].
pub fn cap_reason(text: String) -> String {
    cap(text, MAX_REASON_BYTES)
}

/// Whether `c` would be interpreted by a terminal rather than shown: C0 controls (newline and
/// tab included), DEL, C1 controls, and the Unicode bidirectional overrides and isolates that
/// reorder what a line shows.
pub fn is_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character written as `\u{…}` (ESC becomes `\u{1b}`); borrowed
/// when there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_control(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Displays a string escaped, for log fields and `format!` (`%Escaped(&name)`); keeps the
/// width and alignment of the format spec, so tables line up.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&escape(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn terminal_escapes_and_forged_log_lines_are_made_visible() {
        assert_eq!(escape("vm\x1b[31mred"), "vm\\u{1b}[31mred");
        assert_eq!(escape("a\nINFO forged"), "a\\u{a}INFO forged");
        assert_eq!(escape("del\x7f c1\u{9b}"), "del\\u{7f} c1\\u{9b}");
        assert_eq!(escape("tab\there\r"), "tab\\u{9}here\\u{d}");
        assert_eq!(escape("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["web-01", "Ünïcødé ✓", "C:\\Windows", ""] {
            assert!(matches!(escape(s), Cow::Borrowed(t) if t == s));
        }
    }

    #[test]
    fn escaped_keeps_the_padding_of_a_table() {
        assert_eq!(format!("[{:<8}]", Escaped("a\x1b")), "[a\\u{1b} ]");
        assert_eq!(format!("[{:<6}]", Escaped("ab")), "[ab    ]");
    }

    #[test]
    fn short_text_is_not_capped() {
        assert_eq!(cap("reason".into(), 4096), "reason");
        let exact = "x".repeat(4096);
        assert_eq!(cap_reason(exact.clone()), exact);
    }

    #[test]
    fn a_900_kb_reason_becomes_4_kib_with_a_marker() {
        let capped = cap_reason("y".repeat(900_000));
        assert!(capped.len() <= MAX_REASON_BYTES, "{}", capped.len());
        assert!(capped.len() > MAX_REASON_BYTES - 64);
        assert!(capped.starts_with("yyyy"));
        assert!(capped.ends_with("bytes truncated]"), "{}", &capped[capped.len() - 40..]);
    }

    #[test]
    fn a_cap_never_splits_a_character() {
        let capped = cap("é".repeat(5000), 4096);
        assert!(capped.len() <= 4096);
        assert!(capped.trim_end_matches(|c| c != '…').trim_end_matches('…').chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn capped_text_is_bounded_valid_and_a_prefix(s in "\\PC{0,400}", max in 40usize..300) {
            let capped = cap(s.clone(), max);
            prop_assert!(capped.len() <= max.max(s.len().min(max)));
            if s.len() <= max {
                prop_assert_eq!(&capped, &s);
            } else {
                let kept = capped.rsplit_once('…').map(|(a, _)| a).unwrap_or("");
                prop_assert!(s.starts_with(kept));
            }
        }

        #[test]
        fn escaped_text_has_no_control_characters(s in "[\\x00-\\x{a0}a-z\\x{202e}]{0,100}") {
            let e = escape(&s);
            prop_assert!(!e.chars().any(is_control));
        }
    }
}
