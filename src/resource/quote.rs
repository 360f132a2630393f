//! Quoting for the SQL syncar writes: identifiers and string literals. A leaf: the
//! migrations, the captures and the resources' SQL all build on it. Knows nothing of what
//! it quotes.

/// Items joined with `", "`.
pub(crate) fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// A Postgres identifier, quoted: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A Postgres string literal, read the same whatever `standard_conforming_strings` says:
/// `it's` becomes `'it''s'`, and text with a backslash an `E'...'` literal with it doubled.
pub fn quote_literal(text: &str) -> String {
    let body = text.replace('\'', "''");
    if text.contains('\\') {
        // E'' reads backslashes the same whatever standard_conforming_strings says (as
        // Postgres' own quote_literal() writes them).
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }
}
