//! The cache key: a request's fields framed into a SHA-256, no text made
//! on the way.
//!
//! Each part of the request goes into the hash behind a tag byte naming it
//! (the route, the parameters, each message, call, part and tool, the
//! principal or `shared`), and its fields in a fixed order: a string as its
//! byte length (8 bytes, little-endian) and its bytes, a number as its
//! fixed-width little-endian bytes (a float as its IEEE bits), an option
//! as `0` or `1` and then the value, a list as its length and then its
//! items. So the boundaries between fields cannot shift and two different
//! requests cannot encode alike. Each record is taken apart field by
//! field, so a field added to one fails to compile here until it is
//! encoded.

use orchestrator_plugin::{
    Content, ContentPart, GenerationParams, ImageUrl, Message, Request, Route, Tool, ToolCall,
};
use sha2::{Digest, Sha256};

/// The version of the key's encoding: a change of the encoding changes
/// it, so old entries are never read with a new meaning (`v1` was each
/// part's `Debug` text).
const KEY_VERSION: &[u8] = b"v2|";

/// The cache key of `request` as it stands: the hex SHA-256 of its route,
/// parameters, messages, tools and (unless `shared`) principal; see the
/// crate documentation.
pub fn key(request: &dyn Request, shared: bool) -> String {
    let mut hash = Framed(Sha256::new());
    hash.0.update(KEY_VERSION);
    hash.route(&request.route());
    hash.params(&request.params());
    let messages = request.messages();
    hash.tag(b'M');
    hash.len(messages.len());
    for message in &messages {
        hash.message(message);
    }
    let tools = request.tools();
    hash.tag(b'T');
    hash.len(tools.len());
    for tool in &tools {
        hash.tool(tool);
    }
    if shared {
        hash.tag(b'S');
    } else {
        hash.tag(b'P');
        hash.opt_str(request.principal().as_deref());
    }
    // The digest's own hex (one write, not one per byte).
    format!("{:x}", hash.0.finalize())
}

/// A hash fed framed fields (see the module's documentation).
struct Framed(Sha256);

impl Framed {
    fn tag(&mut self, tag: u8) {
        self.0.update([tag]);
    }

    fn len(&mut self, len: usize) {
        self.0.update((len as u64).to_le_bytes());
    }

    fn str(&mut self, text: &str) {
        self.len(text.len());
        self.0.update(text.as_bytes());
    }

    fn opt_str(&mut self, text: Option<&str>) {
        match text {
            None => self.tag(0),
            Some(text) => {
                self.tag(1);
                self.str(text);
            }
        }
    }

    fn opt<T: Copy>(&mut self, value: Option<T>, bytes: impl Fn(T) -> [u8; 8]) {
        match value {
            None => self.tag(0),
            Some(value) => {
                self.tag(1);
                self.0.update(bytes(value));
            }
        }
    }

    fn opt_u32(&mut self, value: Option<u32>) {
        self.opt(value, |v| u64::from(v).to_le_bytes());
    }

    fn opt_f64(&mut self, value: Option<f64>) {
        self.opt(value, |v| v.to_bits().to_le_bytes());
    }

    fn opt_bool(&mut self, value: Option<bool>) {
        self.opt(value, |v| u64::from(v).to_le_bytes());
    }

    fn route(&mut self, route: &Route) {
        let Route {
            pipeline,
            backend,
            upstream_model,
            max_tokens_limit,
        } = route;
        self.tag(b'R');
        self.str(pipeline);
        self.str(backend);
        self.str(upstream_model);
        self.0.update(max_tokens_limit.to_le_bytes());
    }

    fn params(&mut self, params: &GenerationParams) {
        let GenerationParams {
            model,
            max_tokens,
            max_completion_tokens,
            temperature,
            top_p,
            stop,
            seed,
            presence_penalty,
            frequency_penalty,
            n,
            logprobs,
            top_logprobs,
            user,
            parallel_tool_calls,
            tool_choice,
            response_format,
            extra,
        } = params;
        self.tag(b'G');
        self.str(model);
        self.opt_u32(*max_tokens);
        self.opt_u32(*max_completion_tokens);
        self.opt_f64(*temperature);
        self.opt_f64(*top_p);
        self.len(stop.len());
        for sequence in stop {
            self.str(sequence);
        }
        self.opt(*seed, i64::to_le_bytes);
        self.opt_f64(*presence_penalty);
        self.opt_f64(*frequency_penalty);
        self.opt_u32(*n);
        self.opt_bool(*logprobs);
        self.opt_u32(*top_logprobs);
        self.opt_str(user.as_deref());
        self.opt_bool(*parallel_tool_calls);
        self.opt_str(tool_choice.as_deref());
        self.opt_str(response_format.as_deref());
        self.str(extra);
    }

    fn message(&mut self, message: &Message) {
        let Message {
            role,
            content,
            name,
            tool_calls,
            tool_call_id,
            extra,
        } = message;
        self.tag(b'm');
        self.str(role);
        match content {
            None => self.tag(0),
            Some(Content::Text(text)) => {
                self.tag(1);
                self.str(text);
            }
            Some(Content::Parts(parts)) => {
                self.tag(2);
                self.len(parts.len());
                for part in parts {
                    self.part(part);
                }
            }
        }
        self.opt_str(name.as_deref());
        self.len(tool_calls.len());
        for call in tool_calls {
            self.call(call);
        }
        self.opt_str(tool_call_id.as_deref());
        self.str(extra);
    }

    fn part(&mut self, part: &ContentPart) {
        match part {
            ContentPart::Text(text) => {
                self.tag(b't');
                self.str(text);
            }
            ContentPart::ImageUrl(ImageUrl { url, detail }) => {
                self.tag(b'i');
                self.str(url);
                self.opt_str(detail.as_deref());
            }
            ContentPart::Other(json) => {
                self.tag(b'o');
                self.str(json);
            }
        }
    }

    fn call(&mut self, call: &ToolCall) {
        let ToolCall {
            id,
            kind,
            name,
            arguments,
        } = call;
        self.tag(b'c');
        self.str(id);
        self.str(kind);
        self.str(name);
        self.str(arguments);
    }

    fn tool(&mut self, tool: &Tool) {
        let Tool {
            kind,
            name,
            description,
            parameters,
            strict,
            extra,
        } = tool;
        self.tag(b'f');
        self.str(kind);
        self.str(name);
        self.opt_str(description.as_deref());
        self.opt_str(parameters.as_deref());
        self.opt_bool(*strict);
        self.str(extra);
    }
}
