//! The relay's heartbeats: emitted into the WAL as non-transactional logical messages, and
//! recognised when they come back through this term's stream. Knows nothing of publishing.

use std::collections::VecDeque;
use std::time::Duration;

use crate::coherence::mono_ms;
use crate::schema::capture::MESSAGE_PREFIX;

use super::error::RelayError;

/// The statement that emits a heartbeat (prepared once per term).
pub(super) const EMIT: &str =
    "SELECT pg_catalog.pg_logical_emit_message(false, $1::text, $2::text)";

/// Heartbeats kept as this term's own, at most.
const REMEMBERED: usize = 64;

/// Send times of this term's recent heartbeats: only those vouch for the stream (anyone may
/// emit a logical message; a forged one must not pass for fresh).
#[derive(Default)]
pub(super) struct Heartbeats {
    emitted: VecDeque<u64>,
}

impl Heartbeats {
    /// Emits a heartbeat `hb:{sent}:{instance_id}` with `statement` ([`EMIT`]); one that
    /// takes longer than `timeout` is left to arrive late.
    ///
    /// # Errors
    /// Postgres refusing it within `timeout`.
    pub(super) async fn emit(
        &mut self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        instance_id: &str,
        timeout: Duration,
    ) -> Result<(), RelayError> {
        let sent = mono_ms();
        self.emitted.push_back(sent);
        if self.emitted.len() > REMEMBERED {
            self.emitted.pop_front();
        }
        let content = format!("hb:{sent}:{instance_id}");
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&MESSAGE_PREFIX, &content];
        let emit = client.execute(statement, &params);
        // A late one is not an error: the lease decides (instances see the lag).
        match tokio::time::timeout(timeout, emit).await {
            Ok(Err(source)) => Err(RelayError::Postgres {
                doing: "heartbeat",
                source,
            }),
            _ => Ok(()),
        }
    }

    /// The send time (monotonic milliseconds) of the heartbeat `content` is, if this term
    /// emitted it. `None` for anything else: another relay's heartbeats (an earlier term's
    /// say nothing of this stream's lag), this instance's from an earlier term, forgeries.
    pub(super) fn own(&self, content: &[u8], instance_id: &str) -> Option<u64> {
        let text = String::from_utf8_lossy(content);
        let mut parts = text.splitn(3, ':');
        let (Some("hb"), Some(sent), Some(author)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let sent: u64 = sent.parse().ok()?;
        (author == instance_id && self.emitted.contains(&sent)).then_some(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_terms_own_heartbeats_vouch_for_the_stream() {
        let mut beats = Heartbeats::default();
        beats.emitted.extend([10, 20]);
        assert_eq!(beats.own(b"hb:20:me", "me"), Some(20));
        // Another relay's, an earlier term's, and anything else say nothing.
        assert_eq!(beats.own(b"hb:20:other", "me"), None);
        assert_eq!(beats.own(b"hb:30:me", "me"), None);
        assert_eq!(beats.own(b"hb:x:me", "me"), None);
        assert_eq!(beats.own(b"{\"resource\": \"r\"}", "me"), None);
        // The author is everything after the second colon.
        assert_eq!(beats.own(b"hb:10:me:too", "me:too"), Some(10));
    }
}
