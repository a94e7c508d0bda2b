//! What the tests of every rule share: streaming a completion through
//! [`process_chunk`] as the host does.

use crate::process_chunk;

pub(crate) fn stops(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What streaming `deltas` through [`process_chunk`] gave.
#[derive(Debug, Default)]
pub(crate) struct Streamed {
    /// Every emitted piece, in order.
    pub(crate) pieces: Vec<String>,
    /// Whether `stop` was reported.
    pub(crate) stopped: bool,
    /// The longest carry returned.
    pub(crate) max_carry: usize,
}

impl Streamed {
    pub(crate) fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// Stream `deltas`, then the final empty `last` chunk, as the host
/// does; check on the way that nothing is emitted after a stop.
pub(crate) fn stream(stop: &[String], deltas: &[&str]) -> Streamed {
    let mut out = Streamed::default();
    let mut carry = String::new();
    let calls = deltas
        .iter()
        .map(|d| (*d, false))
        .chain(std::iter::once(("", true)));
    for (delta, last) in calls {
        let chunk = process_chunk(stop, &carry, delta, last).expect("own carry");
        if out.stopped {
            assert_eq!(chunk.emit, "", "output after the stop");
            assert!(chunk.stop, "a stopped stream stays stopped");
        } else if !chunk.emit.is_empty() {
            out.pieces.push(chunk.emit);
        }
        out.stopped |= chunk.stop;
        out.max_carry = out.max_carry.max(chunk.carry.len());
        carry = chunk.carry;
    }
    out
}
