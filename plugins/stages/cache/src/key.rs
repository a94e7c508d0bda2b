//! The cache key: the host's fingerprint of the request and the principal,
//! framed into a SHA-256.
//!
//! The host computes the request's [`fingerprint`](Request::fingerprint):
//! a SHA-256 of its route, parameters, messages and tools, so the chat is
//! never copied into the plugin for the key. The key adds, behind the
//! version prefix, the fingerprint's length and bytes, then `S` for a
//! `shared` cache, or `P` and the principal (`0`, or `1`, its byte length
//! as 8 little-endian bytes and its bytes). So two different requests, or
//! two callers, cannot encode alike.

use orchestrator_plugin::Request;
use sha2::{Digest, Sha256};

/// The version of the key's encoding: a change of the encoding changes
/// it, so old entries are never read with a new meaning (`v1` was each
/// part's `Debug` text, `v2` the fields framed by the plugin itself; the
/// host's fingerprint may also change with its version, which only makes
/// older entries miss).
const KEY_VERSION: &[u8] = b"v3|";

/// The cache key of `request` as it stands: the hex SHA-256 of its
/// fingerprint (route, parameters, messages, tools) and, unless `shared`,
/// its principal; see the crate documentation.
pub fn key(request: &dyn Request, shared: bool) -> String {
    let fingerprint = request.fingerprint();
    let mut hash = Sha256::new();
    hash.update(KEY_VERSION);
    hash.update((fingerprint.len() as u64).to_le_bytes());
    hash.update(&fingerprint);
    if shared {
        hash.update(b"S");
    } else {
        hash.update(b"P");
        match request.principal() {
            None => hash.update([0]),
            Some(principal) => {
                hash.update([1]);
                hash.update((principal.len() as u64).to_le_bytes());
                hash.update(principal.as_bytes());
            }
        }
    }
    // The digest's own hex (one write, not one per byte).
    format!("{:x}", hash.finalize())
}
