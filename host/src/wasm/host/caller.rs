//! The 0.2.1 methods of the `request` resource about who is calling and
//! how the request ends: the granted headers and client address, the
//! principal, answering early, refusing, and response headers.

use wasmtime::component::Resource;

use super::state::HostState;
use crate::wasm::bindings::v2::orchestrator::pipeline::types::{Refusal, RefusalKind};
use crate::wasm::envelope::{Envelope, Refusal as HostRefusal};

/// Longest principal, in bytes.
pub const MAX_PRINCIPAL_BYTES: usize = 256;

/// Most response headers one request may carry.
pub const MAX_RESPONSE_HEADERS: usize = 32;

/// Longest response header name, in bytes.
const MAX_HEADER_NAME_BYTES: usize = 64;

/// Longest response header value, in bytes.
const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// Longest refusal message, in bytes.
const MAX_MESSAGE_BYTES: usize = 4096;

impl HostState {
    pub(super) fn header(
        &mut self,
        request: Resource<Envelope>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        let name = name.to_ascii_lowercase();
        if !self.granted_headers.contains(&name) {
            return Ok(None);
        }
        let envelope = self.table.get(&request)?;
        let Some(caller) = &envelope.caller else {
            return Ok(None);
        };
        let values: Vec<&str> = caller
            .headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Ok((!values.is_empty()).then(|| values.join(", ")))
    }

    pub(super) fn client_address(
        &mut self,
        request: Resource<Envelope>,
    ) -> wasmtime::Result<Option<String>> {
        if !self.granted_client_address {
            return Ok(None);
        }
        let envelope = self.table.get(&request)?;
        Ok(envelope
            .caller
            .as_ref()
            .and_then(|c| c.address)
            .map(|a| a.to_string()))
    }

    pub(super) fn set_principal(
        &mut self,
        request: Resource<Envelope>,
        mut principal: String,
    ) -> wasmtime::Result<()> {
        // Cut, not refused: a principal often comes from a client's header,
        // and a long header must not fail the stage (and count against its
        // breaker).
        cut(&mut principal, MAX_PRINCIPAL_BYTES);
        self.table.get_mut(&request)?.principal = Some(principal);
        Ok(())
    }

    pub(super) fn refuse(
        &mut self,
        request: Resource<Envelope>,
        refusal: Refusal,
    ) -> wasmtime::Result<()> {
        let (status, default_code) = match refusal.kind {
            RefusalKind::Unauthorized => (401, "invalid_api_key"),
            RefusalKind::Forbidden => (403, "permission_denied"),
            RefusalKind::RateLimited => (429, "rate_limit_exceeded"),
        };
        let code = match refusal.code {
            Some(code) => {
                if code.is_empty()
                    || code.len() > 64
                    || !code
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(wasmtime::Error::msg(format!(
                        "a refusal code is 1-64 of [a-z0-9_]; not `{}`",
                        code.escape_debug()
                    )));
                }
                code
            }
            None => default_code.to_string(),
        };
        if let Some(policy) = &refusal.policy
            && !crate::config::valid_name(policy)
        {
            return Err(wasmtime::Error::msg(format!(
                "a refusal's policy is 1-64 of [a-z0-9_-]; not `{}`",
                policy.escape_debug()
            )));
        }
        let mut message = refusal.message;
        cut(&mut message, MAX_MESSAGE_BYTES);
        self.table.get_mut(&request)?.refused = Some(HostRefusal {
            status,
            message,
            code,
            retry_after_ms: refusal.retry_after_ms,
            policy: refusal.policy,
        });
        Ok(())
    }

    pub(super) fn set_response_header(
        &mut self,
        request: Resource<Envelope>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        let name = name.to_ascii_lowercase();
        if let Err(why) = valid_response_header(&name, &value) {
            return Ok(Err(why));
        }
        let headers = &mut self.table.get_mut(&request)?.response_headers;
        if let Some(at) = headers.iter().position(|(n, _)| *n == name) {
            headers[at].1 = value;
        } else if headers.len() >= MAX_RESPONSE_HEADERS {
            return Ok(Err(format!(
                "a request carries at most {MAX_RESPONSE_HEADERS} response headers"
            )));
        } else {
            headers.push((name, value));
        }
        Ok(Ok(()))
    }
}

/// Cut `text` to at most `max` bytes, on a character boundary; whether it
/// was cut.
pub(super) fn cut(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Why `name: value` cannot be a stage's response header, if it cannot.
/// The one header under the host's `x-orchestrator-` prefix that a stage
/// sets: a response cache's `hit`, `miss` or `bypass`.
const CACHE_HEADER: &str = "x-orchestrator-cache";

fn valid_response_header(name: &str, value: &str) -> Result<(), String> {
    if !name.starts_with("x-") || name.len() < 3 || name.len() > MAX_HEADER_NAME_BYTES {
        return Err(format!(
            "a response header's name starts with `x-` and is at most {MAX_HEADER_NAME_BYTES} bytes"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("`{}` is not a header name", name.escape_debug()));
    }
    if (name.starts_with("x-orchestrator-") && name != CACHE_HEADER)
        || name == "x-trace-id"
        || name == "x-request-id"
    {
        return Err(format!("`{name}` is the host's own header"));
    }
    if value.len() > MAX_HEADER_VALUE_BYTES
        || !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!(
            "a header value is at most {MAX_HEADER_VALUE_BYTES} bytes of visible ASCII"
        ));
    }
    Ok(())
}
