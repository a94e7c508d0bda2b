//! The `inference` import, linked only for stages granted it: a plugin's
//! generation requests, answered by the [`Router`] within the call's
//! deadline. The current contract hands over the request (the host sends
//! its chat and writes the answer back into it); the previous one a prompt
//! string, sent as one user message.

use std::time::{Duration, Instant};

use wasmtime::component::Resource;

use super::state::HostState;
use crate::chat::{Message, Params, Tool};
use crate::inference::{BackendError, Completion, GenerateRequest, Router, Target};
use crate::wasm::bindings::v1::orchestrator::pipeline::inference as inference_v1;
use crate::wasm::bindings::v1::orchestrator::pipeline::types as types_v1;
use crate::wasm::bindings::v2::orchestrator::pipeline::inference;
use crate::wasm::bindings::v2::orchestrator::pipeline::inference::InferenceError;
use crate::wasm::engine::EPOCH_TICK;
use crate::wasm::envelope::Envelope;
use crate::wasm::legacy;

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

    /// The backend request for a plugin's call, with the router and the
    /// request's target, or why there is none.
    fn generation_request(
        &self,
        chat: Chat,
        stream: bool,
        deadline: Instant,
    ) -> Result<(Router, GenerateRequest, Option<Target>), BackendError> {
        let router = self.router.clone().ok_or_else(|| BackendError::Failed {
            backend: "-".into(),
            reason: "inference is not granted to this stage".into(),
        })?;
        Ok((
            router,
            GenerateRequest {
                messages: chat.messages,
                tools: chat.tools,
                params: chat.params,
                stream,
                deadline,
                request_id: self.request_id.clone(),
                trace: self.trace.clone(),
            },
            chat.target,
        ))
    }

    /// Run a whole generation.
    async fn complete(
        &mut self,
        (router, request, target): (Router, GenerateRequest, Option<Target>),
    ) -> Result<Completion, BackendError> {
        let started = Instant::now();
        let completion = router.generate(request, target).await;
        self.backend_wait += started.elapsed();
        completion.inspect_err(|e| self.backend_error = Some(e.error_type()))
    }

    /// Start a streamed generation, keeping it for the pipeline.
    async fn start_stream(&mut self, chat: Chat) -> Result<(), BackendError> {
        if self.stream.is_some() {
            return Err(BackendError::Failed {
                backend: "-".into(),
                reason: "a generation was already started in this call".into(),
            });
        }
        // The call must return by its deadline (the first token must be in
        // by then); the generation may go on until the request's.
        let deadline = self.request_deadline.unwrap_or(self.deadline);
        // Streamed upstream only for a client that streams: otherwise the
        // pipeline collects the generation right after this stage anyway.
        let stream = self.client_streams;
        let (router, request, target) = self.generation_request(chat, stream, deadline)?;
        let backend = target.as_ref().map_or("?", Target::backend).to_string();
        let asked = Instant::now();
        let started = tokio::time::timeout_at(
            self.backend_deadline().into(),
            router.stream(request, target),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::Timeout {
                backend,
                reason: "no first token within the inference stage's deadline".into(),
            })
        });
        self.backend_wait += asked.elapsed();
        let stream = started.inspect_err(|e| self.backend_error = Some(e.error_type()))?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The chat of the request behind `request`, as it stands, or the
    /// error of a generation of a chat without messages.
    fn chat_of(
        &self,
        request: &Resource<Envelope>,
    ) -> wasmtime::Result<Result<Chat, InferenceError>> {
        let envelope = self.table.get(request)?;
        if envelope.messages.is_empty() {
            return Ok(Err(InferenceError::InvalidRequest(
                "the request has no messages to answer".into(),
            )));
        }
        Ok(Ok(Chat {
            messages: envelope.messages.clone(),
            tools: envelope.tools.clone(),
            params: envelope.params.clone(),
            target: envelope.target.clone(),
        }))
    }
}

/// What a generation sends: the chat, and where its model was resolved to.
struct Chat {
    messages: Vec<Message>,
    tools: Vec<Tool>,
    params: Params,
    target: Option<Target>,
}

impl Chat {
    /// A 0.1 generation: the prompt as one user message.
    fn of_prompt(prompt: String, params: types_v1::GenerationParams) -> Chat {
        Chat {
            messages: vec![Message::new("user", prompt)],
            tools: Vec::new(),
            params: legacy::params_from_view(params),
            target: None,
        }
    }
}

/// The typed error a plugin sees.
fn inference_error(error: BackendError) -> InferenceError {
    let message = error.to_string();
    match error {
        BackendError::Refused { .. } | BackendError::UnknownModel(_) => {
            InferenceError::InvalidRequest(message)
        }
        BackendError::Unavailable { .. } => InferenceError::Unavailable(message),
        BackendError::Timeout { .. } => InferenceError::Timeout(message),
        BackendError::Failed { .. } => InferenceError::Failed(message),
    }
}

impl inference::Host for HostState {
    async fn generate(
        &mut self,
        request: Resource<Envelope>,
    ) -> wasmtime::Result<Result<(), InferenceError>> {
        let chat = match self.chat_of(&request)? {
            Ok(chat) => chat,
            Err(error) => return Ok(Err(error)),
        };
        let deadline = self.backend_deadline();
        let generation = match self.generation_request(chat, false, deadline) {
            Ok(ready) => ready,
            Err(error) => return Ok(Err(inference_error(error))),
        };
        let completion = match self.complete(generation).await {
            Ok(completion) => completion,
            Err(error) => return Ok(Err(inference_error(error))),
        };
        self.table.get_mut(&request)?.set_answer(completion);
        Ok(Ok(()))
    }

    async fn generate_stream(
        &mut self,
        request: Resource<Envelope>,
    ) -> wasmtime::Result<Result<(), InferenceError>> {
        let chat = match self.chat_of(&request)? {
            Ok(chat) => chat,
            Err(error) => return Ok(Err(error)),
        };
        Ok(self.start_stream(chat).await.map_err(inference_error))
    }
}

impl inference_v1::Host for HostState {
    async fn generate(
        &mut self,
        prompt: String,
        params: types_v1::GenerationParams,
    ) -> Result<inference_v1::Generation, String> {
        let deadline = self.backend_deadline();
        let generation = self
            .generation_request(Chat::of_prompt(prompt, params), false, deadline)
            .map_err(|e| e.to_string())?;
        let completion = self.complete(generation).await.map_err(|e| e.to_string())?;
        Ok(inference_v1::Generation {
            text: completion.text,
            finish_reason: legacy::finish_reason_view(completion.finish_reason),
            usage: types_v1::Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            },
        })
    }

    async fn generate_stream(
        &mut self,
        prompt: String,
        params: types_v1::GenerationParams,
    ) -> Result<(), String> {
        self.start_stream(Chat::of_prompt(prompt, params))
            .await
            .map_err(|e| e.to_string())
    }
}
