//! What an upstream's answer may be: the bytes an answer may hold, and the
//! usage the host believes (see `Backend::pump`, which applies them).

use super::backend::Backend;
use super::generation::GenerateRequest;

/// Bytes one generated token may take, at most, when an answer's size is
/// bounded by the tokens it allows: far above any real tokenizer's longest
/// token, so only an upstream that ignores `max_tokens` is cut.
pub const MAX_BYTES_PER_TOKEN: usize = 64;

/// The most completion tokens an upstream may report for a request that
/// set no `max_tokens`: far above any model's longest answer today, far
/// below the `u32::MAX` a broken upstream sends.
pub const MAX_PLAUSIBLE_TOKENS: u32 = 1 << 20;

impl Backend {
    /// The usage an upstream reported, if it can be true: no more
    /// completion tokens than the request allowed (its `max_tokens`;
    /// reasoning tokens included, as OpenAI counts them), or, for a request
    /// that set none (nothing is then sent upstream), than
    /// [`MAX_PLAUSIBLE_TOKENS`]. An upstream that reports more is not trusted:
    /// its usage is dropped (the host then counts the answer's pieces, as
    /// for an upstream that reports none) and a warning logged, so that a
    /// broken or hostile upstream cannot inflate
    /// `orchestrator_tokens_generated_total` or a token budget.
    pub(super) fn sane_usage(
        &self,
        usage: Option<(u32, u32)>,
        request: &GenerateRequest,
    ) -> Option<(u32, u32)> {
        let (prompt, completion) = usage?;
        let allowed = request.params.max_tokens().unwrap_or(MAX_PLAUSIBLE_TOKENS);
        if completion > allowed {
            tracing::warn!(
                backend = %self.name,
                completion_tokens = completion,
                allowed,
                "the upstream reported more completion tokens than the request allowed; its usage is ignored"
            );
            return None;
        }
        Some((prompt, completion))
    }

    /// The most bytes of text (and tool-call arguments) an answer to
    /// `request` may hold: [`MAX_BYTES_PER_TOKEN`] per token it allows.
    pub(super) fn max_answer_bytes(&self, request: &GenerateRequest) -> usize {
        let tokens = request
            .params
            .max_tokens()
            .unwrap_or(self.settings.max_tokens_limit)
            .min(self.settings.max_tokens_limit);
        (tokens as usize).saturating_mul(MAX_BYTES_PER_TOKEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, BackendKind};

    #[test]
    fn a_usage_past_what_the_request_allowed_is_not_trusted() {
        let metrics = crate::metrics::Metrics::new();
        let backend = Backend::new("b", &BackendConfig::of_kind(BackendKind::Echo), &metrics)
            .expect("an echo backend");
        let request = GenerateRequest::for_test("hi", 16);
        assert_eq!(backend.sane_usage(Some((5, 16)), &request), Some((5, 16)));
        assert_eq!(backend.sane_usage(Some((5, u32::MAX)), &request), None);
        assert_eq!(backend.sane_usage(None, &request), None);
    }
}
