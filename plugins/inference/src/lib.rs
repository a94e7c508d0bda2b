//! The `inference` stage: sends the assembled prompt to the host's
//! inference backend (the `inference` import, granted to this stage by the
//! host configuration).
//!
//! The stage itself holds no model: which backend answers (the built-in
//! deterministic `echo`, or an upstream service) is the host's choice.
//!
//! The bundled stage always starts a streaming generation with
//! `inference.generate-stream` and returns the envelope unchanged: the host
//! then feeds the tokens through the streaming stages that follow (a client
//! that asked for a stream) or collects them (one that wants one answer),
//! and fills in the completion, finish reason and usage when the generation
//! ends. Either way the stage's worker is free again at the first token.
//! [`run_request`] with `stream = false` calls `inference.generate`
//! instead, which returns the whole completion to the plugin (and holds the
//! worker until then): the way for a stage that must see the text.

mod stage;

pub use stage::Inference;

/// A completion as the stage records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Prompt tokens reported by the backend.
    pub prompt_tokens: u32,
    /// Completion tokens reported by the backend.
    pub completion_tokens: u32,
}

/// Why the stage failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// There is no prompt: `assemble` did not run or produced nothing.
    EmptyPrompt,
    /// The backend returned an error.
    Backend(String),
}

/// Run one generation: check the prompt, call `generate`, and normalise the
/// finish reason (anything but `length` counts as `stop`).
pub fn run(
    prompt: &str,
    generate: impl FnOnce(&str) -> Result<Completion, String>,
) -> Result<Completion, Failure> {
    if prompt.trim().is_empty() {
        return Err(Failure::EmptyPrompt);
    }
    let mut completion = generate(prompt).map_err(Failure::Backend)?;
    if completion.finish_reason != "length" {
        completion.finish_reason = "stop".into();
    }
    Ok(completion)
}

/// What [`run_request`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A whole completion was generated: record it in the envelope.
    Completed(Completion),
    /// A streaming generation was started: leave the envelope as it is,
    /// the host fills in the completion when the stream ends.
    Streaming,
}

/// Run one request: check the prompt, then, if the client asked for a
/// stream (`stream`), start one with
/// `generate_stream`, otherwise generate the whole completion with
/// `generate` as [`run`] does. Exactly one of the two is called, and
/// neither for an empty prompt.
pub fn run_request(
    prompt: &str,
    stream: bool,
    generate: impl FnOnce(&str) -> Result<Completion, String>,
    generate_stream: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Outcome, Failure> {
    if !stream {
        return run(prompt, generate).map(Outcome::Completed);
    }
    if prompt.trim().is_empty() {
        return Err(Failure::EmptyPrompt);
    }
    generate_stream(prompt).map_err(Failure::Backend)?;
    Ok(Outcome::Streaming)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str, reason: &str) -> Result<Completion, String> {
        Ok(Completion {
            text: text.into(),
            finish_reason: reason.into(),
            prompt_tokens: 3,
            completion_tokens: 1,
        })
    }

    #[test]
    fn empty_prompt_is_refused_without_calling_the_backend() {
        let result = run("  ", |_| panic!("backend called"));
        assert_eq!(result, Err(Failure::EmptyPrompt));
    }

    #[test]
    fn finish_reason_is_normalised() {
        assert_eq!(run("p", |_| ok("x", "eos")).unwrap().finish_reason, "stop");
        assert_eq!(
            run("p", |_| ok("x", "length")).unwrap().finish_reason,
            "length"
        );
    }

    #[test]
    fn backend_errors_pass_through() {
        assert_eq!(
            run("p", |_| Err("down".into())),
            Err(Failure::Backend("down".into()))
        );
    }

    #[test]
    fn a_stream_request_starts_a_stream_and_generates_nothing() {
        let mut started = None;
        let outcome = run_request(
            "prompt",
            true,
            |_| panic!("generate called for a stream"),
            |prompt| {
                started = Some(prompt.to_string());
                Ok(())
            },
        );
        assert_eq!(outcome, Ok(Outcome::Streaming));
        assert_eq!(started.as_deref(), Some("prompt"));
    }

    #[test]
    fn other_requests_generate_a_whole_completion() {
        let outcome = run_request(
            "p",
            false,
            |_| ok("x", "eos"),
            |_| panic!("generate-stream called without a stream request"),
        );
        let Ok(Outcome::Completed(completion)) = outcome else {
            panic!("not completed: {outcome:?}");
        };
        assert_eq!(
            (completion.text.as_str(), completion.finish_reason.as_str()),
            ("x", "stop")
        );
    }

    #[test]
    fn a_stream_request_checks_the_prompt_and_passes_errors_through() {
        let refused = run_request(" \n", true, |_| panic!("generate"), |_| panic!("stream"));
        assert_eq!(refused, Err(Failure::EmptyPrompt));
        let failed = run_request("p", true, |_| panic!("generate"), |_| Err("busy".into()));
        assert_eq!(failed, Err(Failure::Backend("busy".into())));
    }
}
