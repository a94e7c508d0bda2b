//! The `inference` import, linked only for stages granted it: a plugin's
//! generation requests, answered by the [`Router`] within the call's
//! deadline.

use std::time::{Duration, Instant};

use super::state::HostState;
use crate::inference::{BackendError, GenerateRequest, Router};
use crate::wasm::bindings::orchestrator::pipeline::inference;
use crate::wasm::bindings::{GenerationParams, Usage};
use crate::wasm::engine::EPOCH_TICK;

impl HostState {
    /// When a backend call made by the current plugin call must give up:
    /// a little before the call's own deadline, so that the plugin gets the
    /// backend's error (`upstream_timeout`) before the epoch deadline traps
    /// it (`timeout`).
    fn backend_deadline(&self) -> Instant {
        self.deadline
            .checked_sub(2 * EPOCH_TICK + Duration::from_millis(5))
            .unwrap_or(self.deadline)
    }

    /// The backend request for a plugin's call, or why there is none.
    fn generation_request(
        &self,
        prompt: String,
        params: GenerationParams,
        deadline: Instant,
    ) -> Result<(Router, GenerateRequest), String> {
        let router = self
            .router
            .clone()
            .ok_or_else(|| "inference is not granted to this stage".to_string())?;
        Ok((
            router,
            GenerateRequest {
                prompt,
                model: params.model,
                max_tokens: params.max_tokens,
                temperature: params.temperature,
                stop: params.stop,
                deadline,
                request_id: self.request_id.clone(),
                trace: self.trace.clone(),
            },
        ))
    }
}

impl inference::Host for HostState {
    async fn generate(
        &mut self,
        prompt: String,
        params: GenerationParams,
    ) -> Result<inference::Generation, String> {
        let (router, request) = self.generation_request(prompt, params, self.backend_deadline())?;
        let started = Instant::now();
        let completion = router.generate(request).await;
        self.backend_wait += started.elapsed();
        let completion = completion.map_err(|e| {
            self.backend_error = Some(e.error_type());
            e.to_string()
        })?;
        Ok(inference::Generation {
            text: completion.text,
            finish_reason: completion.finish_reason.to_string(),
            usage: Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            },
        })
    }

    async fn generate_stream(
        &mut self,
        prompt: String,
        params: GenerationParams,
    ) -> Result<(), String> {
        if self.stream.is_some() {
            return Err("a generation was already started in this call".into());
        }
        // The call must return by its deadline (the first token must be in
        // by then); the generation may go on until the request's.
        let deadline = self.request_deadline.unwrap_or(self.deadline);
        let (router, request) = self.generation_request(prompt, params, deadline)?;
        let backend = router.route(&request.model).unwrap_or("?").to_string();
        let asked = Instant::now();
        let started =
            tokio::time::timeout_at(self.backend_deadline().into(), router.stream(request))
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::Timeout {
                        backend,
                        reason: "no first token within the inference stage's deadline".into(),
                    })
                });
        self.backend_wait += asked.elapsed();
        let stream = started.map_err(|e| {
            self.backend_error = Some(e.error_type());
            e.to_string()
        })?;
        self.stream = Some(stream);
        Ok(())
    }
}
