//! The `inference` stage: sends the assembled prompt to the host's
//! inference backend (the `inference.generate` import, granted to this
//! stage by the host configuration) and records the completion and token
//! usage in the envelope.
//!
//! The stage itself holds no model: which backend answers (the built-in
//! deterministic `echo`, or an upstream service) is the host's choice.

#[cfg(target_arch = "wasm32")]
mod component;

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
}
