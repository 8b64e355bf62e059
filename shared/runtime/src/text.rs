//! Rules for the strings the mesh stores: identifiers and category values.

/// The first control character in `s` (U+0000–U+001F, U+007F–U+009F), named for an error
/// message, e.g. `U+0000`. Ids and categories may not contain them: PostgreSQL refuses NUL in
/// text (a record carrying one could never be stored), and the others make ids unreadable in
/// logs and traces.
pub fn control_character(s: &str) -> Option<String> {
    s.chars()
        .find(|c| c.is_control())
        .map(|c| format!("U+{:04X}", c as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_found_and_named() {
        assert_eq!(control_character("cust-00001"), None);
        assert_eq!(control_character("émile 北京"), None);
        assert_eq!(control_character("a\0b").as_deref(), Some("U+0000"));
        assert_eq!(control_character("tab\there").as_deref(), Some("U+0009"));
        assert_eq!(control_character("del\u{7f}").as_deref(), Some("U+007F"));
    }
}
