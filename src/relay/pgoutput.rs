//! A decoder for the pgoutput messages (protocol version 1) that `pgwire-replication` passes
//! through as raw bytes: Relation, Insert, Update, Delete and Truncate. Begin, Commit and
//! logical decoding messages are decoded by the crate itself. Knows nothing of what the rows
//! mean.
//!
//! Format: Postgres docs, "Logical Replication Message Formats" (protocol chapter 55.9).
//! Every read is bounds-checked: malformed bytes give a [`DecodeError`], never a panic.

use bytes::{Buf, Bytes};

/// One column of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Column {
    Null,
    /// An unchanged TOASTed value, not sent.
    Unchanged,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in binary format (only with `binary true`, which syncar does not ask for).
    Binary(Bytes),
}

impl Column {
    /// The text value, if there is one.
    pub fn text(&self) -> Option<&str> {
        match self {
            Column::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A relation's description, sent before the first change of it in a session (and again when
/// it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// Column names in tuple order, and whether each is part of the replica identity.
    pub columns: Vec<(String, bool)>,
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Column>,
    },
    /// `old` is the old replica identity (`K`) or whole old row (`O`, with `REPLICA IDENTITY
    /// FULL`), sent only when the identity changed or is full.
    Update {
        relation: u32,
        old: Option<Vec<Column>>,
        new: Vec<Column>,
    },
    /// `old` holds the replica identity columns (others null), or the whole row.
    Delete {
        relation: u32,
        old: Vec<Column>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// A message this decoder does not need (Type, Origin, ...), by its tag.
    Other(u8),
}

/// Bytes that are not a pgoutput message this decoder understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(&'static str);

/// Decodes one message.
///
/// # Errors
/// Truncated or malformed bytes.
pub fn decode(mut b: Bytes) -> Result<Change, DecodeError> {
    Ok(match u8(&mut b)? {
        b'R' => {
            let id = u32(&mut b)?;
            let schema = cstr(&mut b)?;
            let name = cstr(&mut b)?;
            let _replica_identity = u8(&mut b)?;
            let n = i16(&mut b)?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = u8(&mut b)?;
                let column = cstr(&mut b)?;
                let _type_oid = u32(&mut b)?;
                let _type_modifier = u32(&mut b)?;
                columns.push((column, flags & 1 == 1));
            }
            Change::Relation(Relation {
                id,
                schema,
                name,
                columns,
            })
        }
        b'I' => {
            let relation = u32(&mut b)?;
            if u8(&mut b)? != b'N' {
                return Err(DecodeError("insert without a new tuple"));
            }
            Change::Insert {
                relation,
                new: tuple(&mut b)?,
            }
        }
        b'U' => {
            let relation = u32(&mut b)?;
            let mut kind = u8(&mut b)?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(tuple(&mut b)?);
                kind = u8(&mut b)?;
            }
            if kind != b'N' {
                return Err(DecodeError("update without a new tuple"));
            }
            Change::Update {
                relation,
                old,
                new: tuple(&mut b)?,
            }
        }
        b'D' => {
            let relation = u32(&mut b)?;
            if !matches!(u8(&mut b)?, b'K' | b'O') {
                return Err(DecodeError("delete without an old tuple"));
            }
            Change::Delete {
                relation,
                old: tuple(&mut b)?,
            }
        }
        b'T' => {
            let n = u32(&mut b)?;
            let _options = u8(&mut b)?;
            // Each id takes 4 bytes: a count the message cannot hold is malformed.
            if (n as usize).saturating_mul(4) > b.remaining() {
                return Err(DecodeError("truncate lists more relations than it holds"));
            }
            let relations = (0..n).map(|_| u32(&mut b)).collect::<Result<_, _>>()?;
            Change::Truncate { relations }
        }
        other => Change::Other(other),
    })
}

fn need(b: &Bytes, n: usize) -> Result<(), DecodeError> {
    if b.remaining() < n {
        Err(DecodeError("truncated"))
    } else {
        Ok(())
    }
}

fn u8(b: &mut Bytes) -> Result<u8, DecodeError> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn i16(b: &mut Bytes) -> Result<i16, DecodeError> {
    need(b, 2)?;
    Ok(b.get_i16())
}

fn u32(b: &mut Bytes) -> Result<u32, DecodeError> {
    need(b, 4)?;
    Ok(b.get_u32())
}

fn cstr(b: &mut Bytes) -> Result<String, DecodeError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(DecodeError("unterminated string"))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

fn tuple(b: &mut Bytes) -> Result<Vec<Column>, DecodeError> {
    let n = i16(b)?;
    // Each column takes at least one byte.
    if n.max(0) as usize > b.remaining() {
        return Err(DecodeError("tuple lists more columns than it holds"));
    }
    let mut columns = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        columns.push(match u8(b)? {
            b'n' => Column::Null,
            b'u' => Column::Unchanged,
            kind @ (b't' | b'b') => {
                let len = usize::try_from(u32(b)?).map_err(|_| DecodeError("column too long"))?;
                need(b, len)?;
                let value = b.split_to(len);
                if kind == b't' {
                    Column::Text(value)
                } else {
                    Column::Binary(value)
                }
            }
            _ => return Err(DecodeError("unknown tuple column kind")),
        });
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn tuple_bytes(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => out.put_u8(b'n'),
                Some(s) => {
                    out.put_u8(b't');
                    out.put_u32(s.len() as u32);
                    out.put_slice(s.as_bytes());
                }
            }
        }
    }

    #[test]
    fn relations_and_row_changes_decode() {
        let mut r = vec![b'R'];
        r.put_u32(16384);
        r.put_slice(b"public\0items\0");
        r.put_u8(b'd');
        r.put_i16(2);
        r.put_u8(1);
        r.put_slice(b"id\0");
        r.put_u32(23);
        r.put_i32(-1);
        r.put_u8(0);
        r.put_slice(b"version\0");
        r.put_u32(20);
        r.put_i32(-1);
        assert_eq!(
            decode(Bytes::from(r)).unwrap(),
            Change::Relation(Relation {
                id: 16384,
                schema: "public".into(),
                name: "items".into(),
                columns: vec![("id".into(), true), ("version".into(), false)],
            })
        );

        let mut u = vec![b'U'];
        u.put_u32(16384);
        u.put_u8(b'K');
        tuple_bytes(&mut u, &[Some("1"), None]);
        u.put_u8(b'N');
        tuple_bytes(&mut u, &[Some("2"), Some("42")]);
        let Change::Update { relation, old, new } = decode(Bytes::from(u)).unwrap() else {
            panic!("an update")
        };
        assert_eq!(relation, 16384);
        assert_eq!(old.unwrap()[0].text(), Some("1"));
        assert_eq!(new[1].text(), Some("42"));

        let mut t = vec![b'T'];
        t.put_u32(2);
        t.put_u8(0);
        t.put_u32(1);
        t.put_u32(2);
        assert_eq!(
            decode(Bytes::from(t)).unwrap(),
            Change::Truncate {
                relations: vec![1, 2]
            }
        );
        assert_eq!(
            decode(Bytes::from_static(b"Y")).unwrap(),
            Change::Other(b'Y')
        );
    }

    #[test]
    fn truncated_messages_are_errors() {
        for bad in [
            &b""[..],
            b"R\0\0",
            b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab",
            b"D\0\0\0\x01X",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding answers a change or an error; never panics, never
        /// allocates for a count the message cannot hold.
        #[test]
        fn any_bytes_decode_or_are_refused(tag in proptest::sample::select(b"RIUDTBCY".to_vec()),
                                           body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut b = vec![tag];
            b.extend_from_slice(&body);
            let _ = decode(Bytes::from(b));
        }
    }
}
