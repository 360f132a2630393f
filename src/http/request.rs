//! Request parsing: what a document path names, the query parameters of a read, the
//! conditions on a write and the JSON body. Each parser answers a value or a client error;
//! none panics, whatever the bytes.

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::error::ApiError;
use crate::model::{JsonText, Version};
use crate::resource::{Catalog, DocRef, Precondition};
use crate::tiers::ReadOptions;

/// What a document path names.
pub struct Target {
    pub doc: DocRef,
    /// The key as the client sent it, percent-decoded (for messages).
    pub key: String,
}

/// Resolves `{resource}/{key}` (the path after `/v1/`) against the catalog.
///
/// # Errors
/// 404 for no such route or resource, 503 for a configured resource whose table does not
/// fit, 400 for a malformed key, 414 for a long one.
pub fn target(catalog: &Catalog, rest: &str, max_key_bytes: usize) -> Result<Target, ApiError> {
    let (name, raw_key) = rest.split_once('/').ok_or(ApiError::NoRoute)?;
    let resource: &Arc<_> = catalog
        .get(name)
        .ok_or_else(|| match catalog.unavailable(name) {
            Some(reason) => ApiError::ResourceUnavailable(reason.to_string()),
            None => ApiError::UnknownResource(name.to_string()),
        })?;
    let key = decode_key(raw_key, max_key_bytes)?;
    let doc = DocRef::new(resource, &key).map_err(ApiError::from)?;
    Ok(Target { doc, key })
}

/// `min_version=N`, `min_lsn=X/Y` and `consistency=strong|default`; anything else is an
/// error, so a typo cannot silently weaken a read.
///
/// # Errors
/// 400 for an unknown parameter or a bad value.
pub fn read_options(query: Option<&str>) -> Result<ReadOptions, ApiError> {
    let mut options = ReadOptions::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "min_version" => {
                let v: i64 = value.parse().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "min_version must be a non-negative integer, not {value:?}"
                    ))
                })?;
                options.min_version = Some(Version(v));
            }
            "min_lsn" => {
                let lsn = pgwire_replication::Lsn::parse(value).map_err(|_| {
                    ApiError::InvalidQuery(format!(
                        "min_lsn must be a WAL position as Postgres writes it (what \
                         pg_current_wal_lsn() returns after your commit, e.g. 16/B374D848), \
                         not {value:?}"
                    ))
                })?;
                options.min_lsn = Some(lsn.as_u64());
            }
            "consistency" => match value {
                "strong" => options.strong = true,
                "default" => options.strong = false,
                _ => {
                    return Err(ApiError::InvalidQuery(format!(
                        "consistency must be strong or default, not {value:?}"
                    )))
                }
            },
            _ => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown query parameter {name:?}; known: min_version, min_lsn, consistency"
                )))
            }
        }
    }
    Ok(options)
}

/// How a write asks to be acknowledged (`consistency=` on a PUT, DELETE or transaction; the
/// names of Dapr's state API). See [`super::consistency`].
pub use crate::config::WriteConsistency;

/// A write's query: `consistency=eventual|default|strong` only (see
/// [`super::consistency`]); `None` when it does not say. Anything else is an error, as on a
/// read.
///
/// # Errors
/// 400 for an unknown parameter or a bad value.
pub fn write_consistency(query: Option<&str>) -> Result<Option<WriteConsistency>, ApiError> {
    let mut asked = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (name, value) {
            ("consistency", "eventual") => asked = Some(WriteConsistency::Eventual),
            ("consistency", "default") => asked = Some(WriteConsistency::Default),
            ("consistency", "strong") => asked = Some(WriteConsistency::Strong),
            ("consistency", _) => {
                return Err(ApiError::InvalidQuery(format!(
                    "consistency must be eventual (answer once committed, Redis and the \
                     other instances behind the answer), default, or strong (answer once \
                     every instance applied the write), not {value:?}"
                )))
            }
            _ => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown query parameter {name:?} on a write; known: consistency"
                )))
            }
        }
    }
    Ok(asked)
}

/// Percent-decodes and checks a key: UTF-8, not empty, no NUL, within the limit.
///
/// # Errors
/// 400 for a malformed key, 414 for a long one.
pub fn decode_key(raw: &str, max_bytes: usize) -> Result<String, ApiError> {
    // Decoding only shrinks: a raw key three times the limit cannot fit.
    if raw.len() > max_bytes.saturating_mul(3) {
        return Err(ApiError::KeyTooLong(max_bytes));
    }
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            ApiError::InvalidKey("key is not valid UTF-8 after percent-decoding".into())
        })?;
    check_key(&key, max_bytes)?;
    Ok(key.into_owned())
}

/// What every key must be, however it came (a path, a batch body): not empty, no NUL, at
/// most `max_bytes`.
///
/// # Errors
/// 400 `invalid_key`, or 414 `key_too_long`.
pub fn check_key(key: &str, max_bytes: usize) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidKey("key must not be empty".into()));
    }
    if key.contains('\0') {
        return Err(ApiError::InvalidKey("key must not contain NUL".into()));
    }
    if key.len() > max_bytes {
        return Err(ApiError::KeyTooLong(max_bytes));
    }
    Ok(())
}

/// `If-Match: *` or a list of ETags (`"N"`, or `"N", "M"`); for PUT also `If-None-Match: *`.
/// `shape_epoch` is the resource's (see [`precondition`]).
///
/// # Errors
/// 400 for a header this API does not understand.
pub fn write_precondition(
    headers: &HeaderMap,
    allow_create_only: bool,
    shape_epoch: i64,
) -> Result<Precondition, ApiError> {
    // A list header may come as several lines: together they are one list (RFC 9110 §5.3).
    let text = |name: &header::HeaderName| -> Result<Option<String>, ApiError> {
        let mut lines = Vec::new();
        for v in headers.get_all(name) {
            let line = v
                .to_str()
                .map_err(|_| ApiError::InvalidHeader(format!("{name} is not ASCII")))?;
            lines.push(line.trim());
        }
        Ok((!lines.is_empty()).then(|| lines.join(", ")))
    };
    let if_match = text(&header::IF_MATCH)?;
    let if_none_match = text(&header::IF_NONE_MATCH)?;
    precondition(if_match, if_none_match, allow_create_only, shape_epoch)
}

/// A write's precondition from the values of `If-Match` and `If-None-Match` (headers, or the
/// fields of a transaction's operation, which take the same values).
///
/// `If-Match` is `*` or a list of ETags (RFC 9110 §13.1.1): the write proceeds when the
/// current ETag is any of them. An ETag is `"N"`, or `"N-E"` once the table changed shape
/// (`Resource::etag`): one naming another epoch than `shape_epoch` names a rendering that no
/// longer is, and matches nothing, as does a weak one (`W/"N"`: If-Match compares strongly)
/// or a well-formed one syncar never issues (412, not 400).
///
/// # Errors
/// 400 for a value this API does not understand.
pub fn precondition(
    if_match: Option<String>,
    if_none_match: Option<String>,
    allow_create_only: bool,
    shape_epoch: i64,
) -> Result<Precondition, ApiError> {
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(ApiError::InvalidHeader(
            "send either If-Match or If-None-Match, not both".into(),
        )),
        (Some(m), None) if m.trim() == "*" => Ok(Precondition::Exists),
        (Some(m), None) => {
            let tags = entity_tags(&m).ok_or_else(|| ApiError::InvalidHeader(if_match_help(&m)))?;
            let versions = tags
                .into_iter()
                .filter(|t| !t.weak)
                .filter_map(|t| {
                    let (version, epoch) = match t.opaque.split_once('-') {
                        Some((v, e)) => (v, Some(e)),
                        None => (t.opaque, None),
                    };
                    let current = epoch.is_none_or(|e| e.parse() == Ok(shape_epoch));
                    current.then(|| version.parse().ok()).flatten()
                })
                .collect();
            Ok(Precondition::Versions(versions))
        }
        (None, Some(m)) if m == "*" && allow_create_only => Ok(Precondition::Absent),
        (None, Some(m)) if allow_create_only => Err(ApiError::InvalidHeader(format!(
            "If-None-Match on a write must be * (create only if absent); got: {m}"
        ))),
        (None, Some(m)) => Err(ApiError::InvalidHeader(format!(
            "If-None-Match on a DELETE is not supported (only * on a PUT); got: {m}"
        ))),
        (None, None) => Ok(Precondition::None),
    }
}

/// What to tell a client whose `If-Match` is not `*` nor a list of ETags. Most often it is a
/// version sent bare (`42`, or `"if_match": "42"` in JSON), and a message that only quotes
/// the rule reads like what was sent: so it says the quotes are missing and spells out the
/// header and the JSON field to send.
fn if_match_help(m: &str) -> String {
    let m = m.trim();
    let elements: Vec<&str> = m
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let is_etag = |e: &str| {
        e.len() > 1 && e.starts_with('"') && e.ends_with('"') && !e[1..e.len() - 1].contains('"')
    };
    let is_bare_version = |e: &str| {
        let (version, epoch) = e.split_once('-').unwrap_or((e, "0"));
        [version, epoch]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let bare: Vec<&str> = elements.iter().copied().filter(|e| !is_etag(e)).collect();
    if bare.is_empty() || !bare.iter().all(|e| is_bare_version(e)) {
        return format!(
            "If-Match must be * or ETags as the ETag header gives them, double quotes included \
             (\"42\", or a list: \"42\", \"43\"); it is: {m}"
        );
    }
    let fixed = elements
        .iter()
        .map(|e| match is_etag(e) {
            true => e.to_string(),
            false => format!("\"{e}\""),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let json = serde_json::to_string(&fixed).expect("a string serializes");
    let what = if bare == [m] {
        format!("the If-Match value {m} came")
    } else {
        format!(
            "the If-Match value has ETags ({}) that came",
            bare.join(", ")
        )
    };
    format!(
        "{what} without double quotes, and the quotes are part of an ETag: send the header as \
         If-Match: {fixed} or, in a transaction's JSON, the field as \"if_match\": {json}"
    )
}

/// One entity tag of an `If-Match` list.
struct EntityTag<'a> {
    /// `W/"..."`.
    weak: bool,
    /// What is between the double quotes.
    opaque: &'a str,
}

/// The entity tags of a list such as `"3", W/"4" , "5"` (RFC 9110 §8.8.3 and §5.6.1: empty
/// elements are allowed, commas may sit inside the quotes); `None` when it is not such a
/// list, or has no tag.
fn entity_tags(list: &str) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = list;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, quoted) = match rest.strip_prefix("W/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let (opaque, after) = quoted.strip_prefix('"')?.split_once('"')?;
        tags.push(EntityTag { weak, opaque });
        rest = after.trim_start_matches([' ', '\t']);
        if !rest.is_empty() && !rest.starts_with(',') {
            return None;
        }
    }
    (!tags.is_empty()).then_some(tags)
}

pub(super) async fn read_json(req: Request<Incoming>, max: usize) -> Result<JsonText, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::BodyTooLarge(max));
    }
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::BodyTooLarge(max)
            } else {
                ApiError::MalformedJson(format!("could not read the body: {e}"))
            }
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::MalformedJson(
            "the body is empty; send a JSON document".into(),
        ));
    }
    JsonText::parse(&body).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    proptest::proptest! {
        /// Whatever a client puts in a path, key decoding answers Ok or a client error, and
        /// an accepted key is within the limit and round-trips through percent-encoding.
        #[test]
        fn any_raw_key_decodes_or_is_refused(raw in ".{0,200}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let encoded: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            for candidate in [raw.as_str(), encoded.as_str()] {
                match decode_key(candidate, 64) {
                    Ok(key) => {
                        proptest::prop_assert!(!key.is_empty() && key.len() <= 64 && !key.contains('\0'));
                    }
                    Err(e) => {
                        let (status, _) = e.status_and_code();
                        proptest::prop_assert!(status.is_client_error());
                    }
                }
            }
        }

        /// Query strings never panic and never yield a negative min_version.
        #[test]
        fn any_query_parses_or_is_refused(query in ".{0,100}") {
            if let Ok(options) = read_options(Some(&query)) {
                proptest::prop_assert!(options.min_version.is_none_or(|v| v.0 >= 0));
            }
        }
    }

    #[test]
    fn keys_are_percent_decoded_and_checked() {
        assert_eq!(decode_key("a%2Fb%20c", 512).unwrap(), "a/b c");
        assert_eq!(decode_key("x/y", 512).unwrap(), "x/y");
        assert!(matches!(decode_key("", 512), Err(ApiError::InvalidKey(_))));
        assert!(matches!(
            decode_key("%00", 512),
            Err(ApiError::InvalidKey(_))
        ));
        assert!(matches!(
            decode_key("%ff", 512),
            Err(ApiError::InvalidKey(_))
        ));
        assert!(matches!(
            decode_key(&"a".repeat(513), 512),
            Err(ApiError::KeyTooLong(_))
        ));
        assert!(matches!(
            decode_key(&"%41".repeat(200), 100),
            Err(ApiError::KeyTooLong(_))
        ));
    }

    #[test]
    fn write_consistency_parses() {
        assert_eq!(write_consistency(None).unwrap(), None);
        assert_eq!(write_consistency(Some("")).unwrap(), None);
        assert_eq!(
            write_consistency(Some("consistency=strong")).unwrap(),
            Some(WriteConsistency::Strong)
        );
        assert_eq!(
            write_consistency(Some("consistency=default")).unwrap(),
            Some(WriteConsistency::Default)
        );
        assert_eq!(
            write_consistency(Some("consistency=eventual")).unwrap(),
            Some(WriteConsistency::Eventual)
        );
        for bad in ["consistency=", "consistency=weak", "min_lsn=0/1", "x"] {
            assert!(
                matches!(write_consistency(Some(bad)), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn read_options_parse() {
        assert_eq!(read_options(None).unwrap(), ReadOptions::default());
        let o = read_options(Some("min_version=42&consistency=strong")).unwrap();
        assert_eq!(o.min_version, Some(Version(42)));
        assert!(o.strong);
        let o = read_options(Some("min_lsn=16/B374D848")).unwrap();
        assert_eq!(o.min_lsn, Some((0x16 << 32) | 0xB374_D848));
        for bad in ["min_lsn=", "min_lsn=16", "min_lsn=x/1", "min_lsn=1/2/3"] {
            let e = read_options(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("min_lsn") && e.contains("pg_current_wal_lsn"),
                "{bad}: {e}"
            );
        }
        for bad in [
            "min_version=x",
            "min_version=-1",
            "consistency=eventual",
            "min_verison=1",
        ] {
            assert!(
                matches!(read_options(Some(bad)), Err(ApiError::InvalidQuery(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn preconditions_parse() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let pre = |pairs: &[(&'static str, &'static str)]| write_precondition(&h(pairs), true, 0);
        assert_eq!(pre(&[]).unwrap(), Precondition::None);
        assert_eq!(
            pre(&[("if-match", "\"42\"")]).unwrap(),
            Precondition::Versions(vec![42])
        );
        assert_eq!(pre(&[("if-match", "*")]).unwrap(), Precondition::Exists);
        assert_eq!(
            pre(&[("if-none-match", "*")]).unwrap(),
            Precondition::Absent
        );
        // Well formed, but never issued: matches nothing (412, not 400).
        assert_eq!(
            pre(&[("if-match", "\"abc\"")]).unwrap(),
            Precondition::Versions(vec![])
        );
        assert!(pre(&[("if-match", "42")]).is_err());
        assert!(write_precondition(&h(&[("if-none-match", "*")]), false, 0).is_err());
        assert!(pre(&[("if-match", "*"), ("if-none-match", "*")]).is_err());
    }

    #[test]
    fn if_match_takes_a_list_of_etags() {
        let versions =
            |value: &str, epoch: i64| match precondition(Some(value.into()), None, true, epoch) {
                Ok(Precondition::Versions(v)) => Ok(v),
                Ok(other) => panic!("{value}: {other:?}"),
                Err(e) => Err(e.to_string()),
            };
        assert_eq!(versions("\"3\", \"5\"", 0), Ok(vec![3, 5]));
        assert_eq!(versions("\"3\",\"5\"", 0), Ok(vec![3, 5]));
        // Empty list elements are allowed (RFC 9110 §5.6.1).
        assert_eq!(versions(" , \"3\" ,, \"5\" ,", 0), Ok(vec![3, 5]));
        // Another shape's ETag, a weak one, one never issued: they match nothing, the others
        // still do.
        assert_eq!(versions("\"3-1\", \"4-2\", \"5\"", 2), Ok(vec![4, 5]));
        assert_eq!(versions("W/\"3\", \"5\", \"x,y\"", 0), Ok(vec![5]));
        assert_eq!(versions("\"3-1\", W/\"4\"", 2), Ok(vec![]));
        for bad in [
            "",
            " ",
            ",",
            "\"3\" \"5\"",
            "\"3\", 5",
            "\"3",
            "*, \"3\"",
            "\"3\"x",
        ] {
            assert!(versions(bad, 0).is_err(), "{bad:?}");
        }
        // Several If-Match lines are one list.
        let mut headers = HeaderMap::new();
        headers.append("if-match", HeaderValue::from_static("\"3\""));
        headers.append("if-match", HeaderValue::from_static("\"5\", \"7\""));
        assert_eq!(
            write_precondition(&headers, false, 0).unwrap(),
            Precondition::Versions(vec![3, 5, 7])
        );
    }

    #[test]
    fn an_unquoted_if_match_is_told_how_to_quote_it() {
        let message = |value: &str| match precondition(Some(value.into()), None, true, 0) {
            Err(ApiError::InvalidHeader(m)) => m,
            other => panic!("{value}: {other:?}"),
        };
        assert_eq!(
            message("42"),
            r#"the If-Match value 42 came without double quotes, and the quotes are part of an ETag: send the header as If-Match: "42" or, in a transaction's JSON, the field as "if_match": "\"42\"""#
        );
        assert_eq!(
            message(" \"3\", 5-2 "),
            r#"the If-Match value has ETags (5-2) that came without double quotes, and the quotes are part of an ETag: send the header as If-Match: "3", "5-2" or, in a transaction's JSON, the field as "if_match": "\"3\", \"5-2\"""#
        );
        // Not a version sent bare: the rule, and the value as it came.
        assert_eq!(
            message("v1"),
            r#"If-Match must be * or ETags as the ETag header gives them, double quotes included ("42", or a list: "42", "43"); it is: v1"#
        );
        assert!(message("\"3").ends_with("it is: \"3"));
    }
}

/// A key in a JSON body (a batch get's `keys`, a transaction's `key`): a string, or an
/// integer for an integer-keyed resource (`{"keys": [1, 2]}`), taken as its text.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum BodyKey {
    Text(String),
    Int(i64),
}

impl BodyKey {
    /// The key as text, as a path would give it.
    pub fn into_text(self) -> String {
        match self {
            BodyKey::Text(text) => text,
            BodyKey::Int(int) => int.to_string(),
        }
    }
}

/// Deserializes a [`BodyKey`] as its text (`#[serde(deserialize_with)]`).
///
/// # Errors
/// Neither a string nor an integer.
pub(super) fn body_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    <BodyKey as serde::Deserialize>::deserialize(d).map(BodyKey::into_text)
}
