//! The `request` resource of the previous contract (0.1.x): the same
//! envelope, seen and merged as [`crate::wasm::legacy`] describes.

use wasmtime::component::Resource;

use super::request::note;
use super::state::{Field, HostState};
use crate::wasm::bindings::v1::orchestrator::pipeline::request;
use crate::wasm::bindings::v1::orchestrator::pipeline::types::{
    GenerationParams, Message, Passage, Usage,
};
use crate::wasm::envelope::Envelope;
use crate::wasm::legacy::{self, LegacyRequest};

impl AsRef<Envelope> for LegacyRequest {
    fn as_ref(&self) -> &Envelope {
        &self.0
    }
}

impl AsMut<Envelope> for LegacyRequest {
    fn as_mut(&mut self) -> &mut Envelope {
        &mut self.0
    }
}

impl HostState {
    fn legacy(&mut self, request: &Resource<LegacyRequest>) -> wasmtime::Result<&Envelope> {
        Ok(&self.table.get(request)?.0)
    }

    fn legacy_mut(&mut self, request: &Resource<LegacyRequest>) -> wasmtime::Result<&mut Envelope> {
        Ok(&mut self.table.get_mut(request)?.0)
    }
}

impl request::HostRequest for HostState {
    fn id(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<String> {
        Ok(self.legacy(&request)?.request_id.clone())
    }

    fn messages(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<Vec<Message>> {
        Ok(legacy::messages_view(&self.legacy(&request)?.messages))
    }

    fn set_messages(
        &mut self,
        request: Resource<LegacyRequest>,
        messages: Vec<Message>,
    ) -> wasmtime::Result<()> {
        let size = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        self.spend(Field::Messages, size)?;
        legacy::merge_messages(&mut self.legacy_mut(&request)?.messages, messages);
        Ok(())
    }

    fn params(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<GenerationParams> {
        Ok(legacy::params_view(&self.legacy(&request)?.params))
    }

    fn set_params(
        &mut self,
        request: Resource<LegacyRequest>,
        params: GenerationParams,
    ) -> wasmtime::Result<()> {
        let size = params.model.len() + params.stop.iter().map(String::len).sum::<usize>();
        self.spend(Field::Params, size)?;
        legacy::merge_params(&mut self.legacy_mut(&request)?.params, params);
        Ok(())
    }

    fn passages(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<Vec<Passage>> {
        Ok(legacy::passages_view(&self.legacy(&request)?.passages))
    }

    fn set_passages(
        &mut self,
        request: Resource<LegacyRequest>,
        passages: Vec<Passage>,
    ) -> wasmtime::Result<()> {
        self.spend(
            Field::Passages,
            passages.iter().map(|p| p.source.len() + p.text.len()).sum(),
        )?;
        self.legacy_mut(&request)?.passages = legacy::passages_from_view(passages);
        Ok(())
    }

    fn prompt(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<String> {
        Ok(self.legacy(&request)?.prompt.clone())
    }

    fn set_prompt(
        &mut self,
        request: Resource<LegacyRequest>,
        prompt: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Prompt, prompt.len())?;
        self.legacy_mut(&request)?.prompt = prompt;
        Ok(())
    }

    fn completion(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<String> {
        Ok(self.legacy(&request)?.completion.clone())
    }

    fn set_completion(
        &mut self,
        request: Resource<LegacyRequest>,
        completion: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Completion, completion.len())?;
        self.legacy_mut(&request)?.completion = completion;
        Ok(())
    }

    fn finish_reason(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<String> {
        let reason = &self.legacy(&request)?.finish_reason;
        Ok(if reason.is_empty() {
            String::new()
        } else {
            legacy::finish_reason_view(reason)
        })
    }

    fn set_finish_reason(
        &mut self,
        request: Resource<LegacyRequest>,
        reason: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::FinishReason, reason.len())?;
        self.legacy_mut(&request)?.finish_reason = reason;
        Ok(())
    }

    fn chunks(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<Vec<String>> {
        Ok(self.legacy(&request)?.chunks.clone())
    }

    fn set_chunks(
        &mut self,
        request: Resource<LegacyRequest>,
        chunks: Vec<String>,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Chunks, chunks.iter().map(String::len).sum())?;
        self.legacy_mut(&request)?.chunks = chunks;
        Ok(())
    }

    fn usage(&mut self, request: Resource<LegacyRequest>) -> wasmtime::Result<Usage> {
        Ok(legacy::usage_view(self.legacy(&request)?.usage))
    }

    fn set_usage(
        &mut self,
        request: Resource<LegacyRequest>,
        usage: Usage,
    ) -> wasmtime::Result<()> {
        self.legacy_mut(&request)?.usage = crate::chat::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        };
        Ok(())
    }

    fn metadata(
        &mut self,
        request: Resource<LegacyRequest>,
    ) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.legacy(&request)?.metadata.clone())
    }

    fn note(
        &mut self,
        request: Resource<LegacyRequest>,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(note(self.legacy(&request)?, &key))
    }

    fn set_note(
        &mut self,
        request: Resource<LegacyRequest>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.set_note_in(&request, key, value)
    }

    fn drop(&mut self, _request: Resource<LegacyRequest>) -> wasmtime::Result<()> {
        // Lent, never given away: see the current contract's resource.
        Ok(())
    }
}

impl request::Host for HostState {}
