//! The previous contract (`wit/v0.1/`, 0.1.0-0.1.2) over the structured
//! [`Envelope`]: components built against it keep loading and see what
//! they always saw.
//!
//! What a 0.1 stage sees: each message as its role and its text (text
//! parts joined by newlines; other parts and tool calls are not shown; a
//! `developer` message shows as `system`), the parameters as `model`,
//! `max-tokens` (the client's, or 512), `temperature` (the client's, or 1)
//! and `stop`, and the `prompt` string that 0.1 stages pass from
//! `assemble` to `inference`. What it sets is merged back without losing
//! the structure of what it did not change: a message whose role and text
//! are those shown at its position keeps its original form (parts, tool
//! calls, extra fields); a changed or new one becomes a text message.
//! Parameters it left as shown stay as the client sent them. A 0.1
//! `inference.generate(prompt)` sends the prompt upstream as one user
//! message, as 0.1 always did.

pub use super::bindings::LegacyRequest;
use super::bindings::v1::orchestrator::pipeline::{streaming, types};
use super::bindings::{ChunkContext, v2};
use super::envelope::{Envelope, Passage};
use crate::chat::{Content, Message, Params, Usage};

/// The default `max-tokens` a 0.1 stage sees when the client gave none.
pub const LEGACY_MAX_TOKENS: u32 = 512;

/// The role a 0.1 stage sees.
fn role_view(role: &str) -> &str {
    if role == "developer" { "system" } else { role }
}

/// The messages as a 0.1 stage sees them.
pub fn messages_view(messages: &[Message]) -> Vec<types::Message> {
    messages
        .iter()
        .map(|m| types::Message {
            role: role_view(&m.role).to_string(),
            content: m.text(),
        })
        .collect()
}

/// Merge the messages a 0.1 stage set into `messages`.
pub fn merge_messages(messages: &mut Vec<Message>, set: Vec<types::Message>) {
    let old = std::mem::take(messages);
    let mut old = old.into_iter().map(Some).collect::<Vec<_>>();
    *messages = set
        .into_iter()
        .enumerate()
        .map(|(at, new)| {
            let unchanged = old
                .get(at)
                .and_then(Option::as_ref)
                .is_some_and(|m| role_view(&m.role) == new.role && m.text() == new.content);
            match old.get_mut(at).and_then(Option::take) {
                Some(message) if unchanged => message,
                _ => Message {
                    role: new.role,
                    content: Some(Content::Text(new.content)),
                    ..Message::default()
                },
            }
        })
        .collect();
}

/// A temperature as 0.1's `f32`, and back without widening artefacts
/// (`0.7` stays `0.7`).
fn temperature_view(temperature: Option<f64>) -> f32 {
    temperature.map_or(1.0, |t| t as f32)
}

/// `value`'s shortest decimal as an `f64`, unless that is not `value`
/// again as an `f32` (a decimal exactly halfway between two `f32`s).
fn widen(value: f32) -> f64 {
    value
        .to_string()
        .parse()
        .ok()
        .filter(|wide: &f64| *wide as f32 == value)
        .unwrap_or(f64::from(value))
}

/// The parameters as a 0.1 stage sees them.
pub fn params_view(params: &Params) -> types::GenerationParams {
    types::GenerationParams {
        model: params.model.clone(),
        max_tokens: params.max_tokens().unwrap_or(LEGACY_MAX_TOKENS),
        temperature: temperature_view(params.temperature),
        stop: params.stop.clone(),
    }
}

/// Merge the parameters a 0.1 stage set into `params`.
pub fn merge_params(params: &mut Params, set: types::GenerationParams) {
    let shown = params_view(params);
    params.model = set.model;
    if set.max_tokens != shown.max_tokens {
        if params.max_completion_tokens.is_some() {
            params.max_completion_tokens = Some(set.max_tokens);
        } else {
            params.max_tokens = Some(set.max_tokens);
        }
    }
    if set.temperature.to_bits() != shown.temperature.to_bits() {
        params.temperature = Some(widen(set.temperature));
    }
    params.stop = set.stop;
}

/// Parameters of a 0.1 generation: the stage's view, as the client's
/// parameters would say it.
pub fn params_from_view(view: types::GenerationParams) -> Params {
    Params {
        model: view.model,
        max_tokens: Some(view.max_tokens),
        temperature: Some(widen(view.temperature)),
        stop: view.stop,
        ..Params::default()
    }
}

/// Passages for a 0.1 stage.
pub fn passages_view(passages: &[Passage]) -> Vec<types::Passage> {
    passages
        .iter()
        .map(|p| types::Passage {
            source: p.source.clone(),
            text: p.text.clone(),
            score: p.score,
        })
        .collect()
}

/// Passages a 0.1 stage set.
pub fn passages_from_view(passages: Vec<types::Passage>) -> Vec<Passage> {
    passages
        .into_iter()
        .map(|p| Passage {
            source: p.source,
            text: p.text,
            score: p.score,
        })
        .collect()
}

/// Usage for a 0.1 stage.
pub fn usage_view(usage: Usage) -> types::Usage {
    types::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

/// The finish reason a 0.1 stage sees: `stop` or `length`, as 0.1
/// promised.
pub fn finish_reason_view(reason: &str) -> String {
    if reason == "length" { "length" } else { "stop" }.to_string()
}

/// The whole envelope, for a 0.1 by-value stage.
pub fn envelope_view(envelope: &Envelope) -> types::Envelope {
    types::Envelope {
        request_id: envelope.request_id.clone(),
        messages: messages_view(&envelope.messages),
        params: params_view(&envelope.params),
        passages: passages_view(&envelope.passages),
        prompt: envelope.prompt.clone(),
        completion: envelope.completion.clone(),
        finish_reason: if envelope.finish_reason.is_empty() {
            String::new()
        } else {
            finish_reason_view(&envelope.finish_reason)
        },
        chunks: envelope.chunks.clone(),
        usage: usage_view(envelope.usage),
        metadata: envelope.metadata.clone(),
    }
}

/// Merge what a 0.1 by-value stage returned into `envelope` (its request
/// id is the host's and stays).
pub fn merge_envelope(envelope: &mut Envelope, set: types::Envelope) {
    let shown_reason = finish_reason_view(&envelope.finish_reason);
    merge_messages(&mut envelope.messages, set.messages);
    merge_params(&mut envelope.params, set.params);
    envelope.passages = passages_from_view(set.passages);
    envelope.prompt = set.prompt;
    envelope.completion = set.completion;
    if set.finish_reason != shown_reason || envelope.finish_reason.is_empty() {
        envelope.finish_reason = set.finish_reason;
    }
    envelope.chunks = set.chunks;
    envelope.usage = Usage {
        prompt_tokens: set.usage.prompt_tokens,
        completion_tokens: set.usage.completion_tokens,
    };
    envelope.metadata = set.metadata;
}

/// Total bytes of the strings of a 0.1 envelope: what a by-value stage
/// returned, against its `max_output_bytes`.
pub fn envelope_view_bytes(envelope: &types::Envelope) -> usize {
    envelope.request_id.len()
        + envelope
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
        + envelope.params.model.len()
        + envelope.params.stop.iter().map(String::len).sum::<usize>()
        + envelope
            .passages
            .iter()
            .map(|p| p.source.len() + p.text.len())
            .sum::<usize>()
        + envelope.prompt.len()
        + envelope.completion.len()
        + envelope.finish_reason.len()
        + envelope.chunks.iter().map(String::len).sum::<usize>()
        + envelope
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

impl From<&ChunkContext> for streaming::ChunkContext {
    fn from(context: &ChunkContext) -> streaming::ChunkContext {
        let p: &v2::orchestrator::pipeline::types::GenerationParams = &context.params;
        streaming::ChunkContext {
            request_id: context.request_id.clone(),
            params: types::GenerationParams {
                model: p.model.clone(),
                max_tokens: p
                    .max_completion_tokens
                    .or(p.max_tokens)
                    .unwrap_or(LEGACY_MAX_TOKENS),
                temperature: temperature_view(p.temperature),
                stop: p.stop.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ContentPart;

    fn chat() -> Vec<Message> {
        vec![
            Message::new("developer", "be brief"),
            Message {
                role: "user".into(),
                content: Some(Content::Parts(vec![
                    ContentPart::Text("look".into()),
                    ContentPart::ImageUrl {
                        url: "u".into(),
                        detail: None,
                    },
                ])),
                ..Message::default()
            },
        ]
    }

    #[test]
    fn unchanged_messages_keep_their_structure() {
        let mut messages = chat();
        let view = messages_view(&messages);
        assert_eq!(view[0].role, "system");
        assert_eq!(view[1].content, "look");
        merge_messages(&mut messages, view);
        assert_eq!(messages, chat());
    }

    #[test]
    fn changed_and_new_messages_become_text() {
        let mut messages = chat();
        let mut view = messages_view(&messages);
        view[1].content = "changed".into();
        view.push(types::Message {
            role: "user".into(),
            content: "more".into(),
        });
        merge_messages(&mut messages, view);
        assert_eq!(messages[0], chat()[0]);
        assert_eq!(messages[1], Message::new("user", "changed"));
        assert_eq!(messages[2], Message::new("user", "more"));
    }

    #[test]
    fn parameters_left_as_shown_stay_unset() {
        let mut params = Params::for_model("m");
        params.seed = Some(4);
        let view = params_view(&params);
        assert_eq!((view.max_tokens, view.temperature), (512, 1.0));
        merge_params(&mut params, view.clone());
        assert_eq!(params.max_tokens, None);
        assert_eq!(params.temperature, None);
        assert_eq!(params.seed, Some(4));
        let mut changed = view;
        changed.temperature = 0.7;
        merge_params(&mut params, changed);
        assert_eq!(params.temperature, Some(0.7));
    }

    #[test]
    fn a_temperature_whose_decimal_is_halfway_reads_back_as_set() {
        // Shown as 7.038531e-26, which as an f64 is exactly halfway to the
        // next f32: narrowed back, it became that neighbour.
        for set in [f32::from_bits(0x15ae_43fd), -f32::from_bits(0x15ae_43fd)] {
            let mut params = Params::for_model("m");
            let mut view = params_view(&params);
            view.temperature = set;
            merge_params(&mut params, view);
            assert_eq!(params_view(&params).temperature.to_bits(), set.to_bits());
        }
    }

    use proptest::collection::vec as list;
    use proptest::option::of;
    use proptest::prelude::*;

    /// A message of the chat: text or parts, perhaps calling tools.
    fn message() -> impl Strategy<Value = Message> {
        let part = prop_oneof![
            ".{0,4}".prop_map(ContentPart::Text),
            ".{0,4}".prop_map(|url| ContentPart::ImageUrl { url, detail: None }),
        ];
        let content = of(prop_oneof![
            ".{0,4}".prop_map(Content::Text),
            list(part, 0..3).prop_map(Content::Parts),
        ]);
        (
            "user|developer|system|.{0,3}",
            content,
            list(".{0,3}", 0..2),
        )
            .prop_map(|(role, content, calls)| Message {
                role,
                content,
                tool_calls: calls
                    .into_iter()
                    .map(|name| crate::chat::ToolCall {
                        name,
                        ..Default::default()
                    })
                    .collect(),
                ..Message::default()
            })
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_legacy_messages_merge_by_position(
            messages in list(message(), 0..5),
            // Per position: left as shown (`None`), or set to a role and a text.
            changes in list(of(("user|developer|system|.{0,3}", ".{0,4}")), 0..7),
        ) {
            let shown = messages_view(&messages);
            let set: Vec<types::Message> = changes.into_iter().enumerate().map(|(at, change)| match (change, shown.get(at)) {
                (None, Some(shown)) => shown.clone(),
                (change, _) => { let (role, content) = change.unwrap_or_default(); types::Message { role, content } }
            }).collect();
            let mut merged = messages.clone();
            merge_messages(&mut merged, set.clone());
            prop_assert_eq!(merged.len(), set.len());
            for (at, (merged, set)) in merged.iter().zip(&set).enumerate() {
                // A message set as shown keeps its form; any other is text.
                let kept = shown.get(at).is_some_and(|m| m.role == set.role && m.content == set.content);
                let text = Message::new(&set.role, set.content.clone());
                prop_assert_eq!(merged, if kept { &messages[at] } else { &text });
            }
        }

        #[test]
        fn arbitrary_legacy_parameters_read_back_as_set(
            (model, max_tokens, max_completion_tokens, stop) in (".{0,3}", of(any::<u32>()), of(any::<u32>()), list(".{0,2}", 0..2)),
            temperature in of(any::<f64>().prop_filter("JSON numbers are finite", |t| t.is_finite())),
            set in of((".{0,3}", any::<u32>(), any::<f32>(), list(".{0,2}", 0..2))),
        ) {
            let params = Params { model, max_tokens, max_completion_tokens, temperature, stop, seed: Some(4), ..Params::default() };
            let mut merged = params.clone();
            merge_params(&mut merged, params_view(&params));
            prop_assert_eq!(&merged, &params);
            let Some((model, max_tokens, temperature, stop)) = set else { return Ok(()) };
            merge_params(&mut merged, types::GenerationParams { model, max_tokens, temperature, stop });
            let (seen, shown) = (params_view(&merged), params_view(&params));
            prop_assert_eq!(seen.max_tokens, max_tokens);
            prop_assert!(seen.temperature.to_bits() == temperature.to_bits() || seen.temperature.is_nan() && temperature.is_nan());
            prop_assert_eq!(merged.seed, Some(4));
            if max_tokens == shown.max_tokens {
                prop_assert_eq!((merged.max_tokens, merged.max_completion_tokens), (params.max_tokens, params.max_completion_tokens));
            }
            if temperature.to_bits() == shown.temperature.to_bits() {
                prop_assert_eq!(merged.temperature, params.temperature);
            }
        }
    }
}
