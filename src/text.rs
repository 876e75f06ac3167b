//! Text cut to a bound on a character boundary: for error texts stored in
//! bounded columns and headers, and for values quoted in messages, so a
//! hostile or runaway input cannot make them huge.

use std::borrow::Cow;

/// Marker [`bounded_text`] puts where it cut.
const CUT_MARK: &str = " ... [cut]";

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn prefix_within(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` in at most `max` bytes, with NUL characters replaced (Postgres
/// text cannot hold them) and a marker where something was cut.
pub fn bounded_text(text: &str, max: usize) -> String {
    let clean = if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    };
    if clean.len() <= max {
        return clean.into_owned();
    }
    format!(
        "{}{CUT_MARK}",
        prefix_within(&clean, max.saturating_sub(CUT_MARK.len()))
    )
}

/// `text` in at most `max` bytes plus `...` when it was cut: for a value
/// quoted in a message.
pub fn elided(text: &str, max: usize) -> Cow<'_, str> {
    let kept = prefix_within(text, max);
    if kept.len() < text.len() {
        Cow::Owned(format!("{kept}..."))
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_char_boundaries() {
        assert_eq!(prefix_within("héllo", 2), "h");
        assert_eq!(prefix_within("héllo", 3), "hé");
        assert_eq!(prefix_within("short", 100), "short");
        assert_eq!(elided("abcdef", 3), "abc...");
        assert_eq!(elided("abc", 3), "abc");
    }

    #[test]
    fn bounded_text_cuts_on_char_boundaries() {
        assert_eq!(bounded_text("short", 100), "short");
        let long = "é".repeat(100);
        let cut = bounded_text(&long, 51);
        assert!(cut.len() <= 51, "{}", cut.len());
        assert!(cut.ends_with("[cut]"));
        assert_eq!(bounded_text("a\0b", 10), "a\u{fffd}b");
    }
}
