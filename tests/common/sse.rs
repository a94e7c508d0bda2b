//! The one client-side reader of the host's server-sent events: the
//! `data:` chunks of a streamed answer, checked for framing, and what the
//! tests read from them.

use serde_json::Value;

/// The `chat.completion.chunk` objects of a stream, in order; `Err` unless
/// every event is a `data:` line, the last is `[DONE]` and the others are
/// JSON.
pub fn try_chunks(text: &str) -> Result<Vec<Value>, String> {
    if !text.ends_with("data: [DONE]\n\n") {
        return Err(format!("the stream does not end with [DONE]: {text:?}"));
    }
    let mut chunks = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .ok_or_else(|| format!("bad event {event:?}"))?;
        if data == "[DONE]" {
            break;
        }
        chunks.push(serde_json::from_str(data).map_err(|e| format!("bad chunk {data:?}: {e}"))?);
    }
    Ok(chunks)
}

/// [`try_chunks`], panicking on a malformed stream.
pub fn chunks(text: &str) -> Vec<Value> {
    try_chunks(text).unwrap_or_else(|e| panic!("{e}"))
}

/// The non-empty content deltas, in order.
pub fn pieces(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

/// The streamed text: the content deltas, concatenated.
pub fn content(chunks: &[Value]) -> String {
    pieces(chunks).concat()
}

/// The last finish reason given.
pub fn finish_reason(chunks: &[Value]) -> Option<String> {
    chunks
        .iter()
        .rev()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .map(String::from)
}

/// The error event, if the stream ended with one.
pub fn error(chunks: &[Value]) -> Option<&Value> {
    chunks.iter().find_map(|c| c.get("error"))
}
