//! Inference backends: what answers a plugin's `inference.generate` call.
//!
//! A backend is a [`Backend`] trait object chosen by the configuration
//! (`[inference] backend`). Plugins never see which one: the `inference`
//! stage calls the import, the host routes it to the backend and counts the
//! generated tokens in `orchestrator_tokens_generated_total{worker_type}`,
//! with the backend's name as `worker_type`.
//!
//! Backends are called synchronously on a stage worker thread (plugins run
//! on dedicated threads, not on the async runtime), so a network backend may
//! block; it must bound its own wait by the deadline it is given.
//!
//! # `echo`
//!
//! The built-in default is **not a language model**. It is a deterministic
//! stand-in that needs no network and no weights: it answers with the last
//! user turn of the prompt (the text after the last `User:` line), cut to
//! `max_tokens` tokens. Token counts are real counts of the prompt and the
//! answer under the shared tokenizer (`orchestrator-text`).

use std::time::Instant;

use orchestrator_text::{count_tokens, truncate_tokens};

/// What a plugin asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// The model name the client asked for.
    pub model: &'a str,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// The call must finish by then.
    pub deadline: Instant,
}

/// A backend's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// A backend failure. Its message is shown to the plugin and may reach the
/// client, so it must never contain credentials.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The model is not served by this backend.
    #[error("model `{0}` is not served by this backend")]
    UnknownModel(String),
    /// The backend could not answer.
    #[error("inference backend failed: {0}")]
    Failed(String),
}

/// An inference backend.
pub trait Backend: Send + Sync + 'static {
    /// Its name: the `worker_type` label.
    fn name(&self) -> &str;
    /// Model names it serves (listed by `GET /v1/models`).
    fn models(&self) -> &[String];
    /// Generate a completion.
    fn generate(&self, request: &GenerateRequest<'_>) -> Result<Completion, BackendError>;
}

/// The deterministic built-in backend (see the module docs).
#[derive(Debug, Clone)]
pub struct Echo {
    models: Vec<String>,
}

impl Default for Echo {
    fn default() -> Self {
        Echo {
            models: vec!["echo".to_string()],
        }
    }
}

impl Echo {
    /// The text `echo` answers `prompt` with, before the token limit.
    pub fn answer(prompt: &str) -> &str {
        let turn = prompt
            .rfind("User:")
            .map_or(prompt, |at| &prompt[at + "User:".len()..]);
        let turn = turn.rfind("\nAssistant:").map_or(turn, |end| &turn[..end]);
        turn.trim()
    }
}

impl Backend for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn models(&self) -> &[String] {
        &self.models
    }

    fn generate(&self, request: &GenerateRequest<'_>) -> Result<Completion, BackendError> {
        if !self.models.iter().any(|m| m == request.model) {
            return Err(BackendError::UnknownModel(request.model.to_string()));
        }
        let answer = Echo::answer(request.prompt);
        let text = truncate_tokens(answer, request.max_tokens as usize);
        let completion_tokens = count_tokens(text);
        Ok(Completion {
            finish_reason: if text.len() < answer.len() {
                "length"
            } else {
                "stop"
            },
            text: text.to_string(),
            prompt_tokens: count_tokens(request.prompt) as u32,
            completion_tokens: completion_tokens as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str, max_tokens: u32) -> GenerateRequest<'_> {
        GenerateRequest {
            prompt,
            model: "echo",
            max_tokens,
            temperature: 0.0,
            deadline: Instant::now(),
        }
    }

    #[test]
    fn echoes_the_last_user_turn() {
        let prompt =
            "System: s\n\nUser: first\nAssistant: a\nUser: What is backpressure?\nAssistant:";
        let out = Echo::default().generate(&request(prompt, 100)).unwrap();
        assert_eq!(out.text, "What is backpressure?");
        assert_eq!(out.finish_reason, "stop");
        assert_eq!(out.completion_tokens, 4);
        assert_eq!(out.prompt_tokens as usize, count_tokens(prompt));
    }

    #[test]
    fn max_tokens_cuts_with_length() {
        let out = Echo::default()
            .generate(&request("User: one two three\nAssistant:", 2))
            .unwrap();
        assert_eq!(out.text, "one two");
        assert_eq!(out.finish_reason, "length");
        assert_eq!(out.completion_tokens, 2);
    }

    #[test]
    fn unknown_models_are_refused() {
        let mut r = request("User: x", 5);
        r.model = "gpt-4o";
        assert_eq!(
            Echo::default().generate(&r),
            Err(BackendError::UnknownModel("gpt-4o".into()))
        );
    }
}
