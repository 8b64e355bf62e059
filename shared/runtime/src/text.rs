//! Rules for the strings the mesh stores: identifiers and category values. The one home of the
//! entity-id rule: the gateway and the features service both apply [`entity_id_problem`].

/// Longest entity id or category value accepted, in bytes.
pub const MAX_STRING_BYTES: usize = 256;

/// What is wrong with an entity id, if anything, as the end of a sentence naming it (e.g.
/// `"is empty"`); `None` for a valid id.
pub fn entity_id_problem(id: &str) -> Option<String> {
    if id.trim().is_empty() {
        return Some("is empty".to_owned());
    }
    if id.len() > MAX_STRING_BYTES {
        return Some(format!(
            "is {} bytes long; the limit is {MAX_STRING_BYTES}",
            id.len()
        ));
    }
    control_character(id).map(|c| format!("contains a control character ({c})"))
}

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
    fn entity_ids_must_be_short_printable_and_not_blank() {
        assert_eq!(entity_id_problem("cust-00001"), None);
        assert_eq!(entity_id_problem(" ").as_deref(), Some("is empty"));
        assert_eq!(
            entity_id_problem(&"x".repeat(257)).as_deref(),
            Some("is 257 bytes long; the limit is 256")
        );
        assert_eq!(entity_id_problem(&"x".repeat(256)), None);
        assert_eq!(
            entity_id_problem("a\nb").as_deref(),
            Some("contains a control character (U+000A)")
        );
    }

    #[test]
    fn control_characters_are_found_and_named() {
        assert_eq!(control_character("cust-00001"), None);
        assert_eq!(control_character("émile 北京"), None);
        assert_eq!(control_character("a\0b").as_deref(), Some("U+0000"));
        assert_eq!(control_character("tab\there").as_deref(), Some("U+0009"));
        assert_eq!(control_character("del\u{7f}").as_deref(), Some("U+007F"));
    }
}
