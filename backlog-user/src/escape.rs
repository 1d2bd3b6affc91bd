//! Strings from other users reach the operator's terminal: a process can name itself
//! anything with prctl(PR_SET_NAME), escape sequences included, and a namespace name
//! is a file name. Text output shows every control character as \xNN (and a
//! backslash as \\), so such a name can neither move the cursor nor hide a line.
use std::borrow::Cow;
use std::fmt::Write;

pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape("nginx: worker"), "nginx: worker");
        assert_eq!(escape("\x1b[2J\x1b[Hevil"), "\\x1b[2J\\x1b[Hevil");
        assert_eq!(escape("a\u{9b}b\x7f\n"), "a\\x9bb\\x7f\\x0a");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
    }
}
