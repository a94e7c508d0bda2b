//! The `request` resource (WIT 0.1.2): the envelope of the request being
//! processed, lent to the guest for one `process` call, and the output
//! budget every setter is checked against.

use wasmtime::component::Resource;

use super::state::{Field, HostState, RequestBudget};
use crate::wasm::bindings::orchestrator::pipeline::request;
use crate::wasm::bindings::{Envelope, GenerationParams, Message, Passage, Usage};

/// The `request` resource: the envelope in the store's resource table.
/// Getters copy one field out; setters check the field against the output
/// budget and replace it. A setter over budget records the size and traps,
/// which ends the call with `output_too_large`.
impl request::HostRequest for HostState {
    fn id(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.request_id.clone())
    }

    fn messages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Message>> {
        Ok(self.table.get(&request)?.messages.clone())
    }

    fn set_messages(
        &mut self,
        request: Resource<Envelope>,
        messages: Vec<Message>,
    ) -> wasmtime::Result<()> {
        let size = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        self.spend(Field::Messages, size)?;
        self.table.get_mut(&request)?.messages = messages;
        Ok(())
    }

    fn params(&mut self, request: Resource<Envelope>) -> wasmtime::Result<GenerationParams> {
        Ok(self.table.get(&request)?.params.clone())
    }

    fn set_params(
        &mut self,
        request: Resource<Envelope>,
        params: GenerationParams,
    ) -> wasmtime::Result<()> {
        let size = params.model.len() + params.stop.iter().map(String::len).sum::<usize>();
        self.spend(Field::Params, size)?;
        self.table.get_mut(&request)?.params = params;
        Ok(())
    }

    fn passages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Passage>> {
        Ok(self.table.get(&request)?.passages.clone())
    }

    fn set_passages(
        &mut self,
        request: Resource<Envelope>,
        passages: Vec<Passage>,
    ) -> wasmtime::Result<()> {
        self.spend(
            Field::Passages,
            passages.iter().map(|p| p.source.len() + p.text.len()).sum(),
        )?;
        self.table.get_mut(&request)?.passages = passages;
        Ok(())
    }

    fn prompt(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.prompt.clone())
    }

    fn set_prompt(&mut self, request: Resource<Envelope>, prompt: String) -> wasmtime::Result<()> {
        self.spend(Field::Prompt, prompt.len())?;
        self.table.get_mut(&request)?.prompt = prompt;
        Ok(())
    }

    fn completion(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.completion.clone())
    }

    fn set_completion(
        &mut self,
        request: Resource<Envelope>,
        completion: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Completion, completion.len())?;
        self.table.get_mut(&request)?.completion = completion;
        Ok(())
    }

    fn finish_reason(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.finish_reason.clone())
    }

    fn set_finish_reason(
        &mut self,
        request: Resource<Envelope>,
        reason: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::FinishReason, reason.len())?;
        self.table.get_mut(&request)?.finish_reason = reason;
        Ok(())
    }

    fn chunks(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<String>> {
        Ok(self.table.get(&request)?.chunks.clone())
    }

    fn set_chunks(
        &mut self,
        request: Resource<Envelope>,
        chunks: Vec<String>,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Chunks, chunks.iter().map(String::len).sum())?;
        self.table.get_mut(&request)?.chunks = chunks;
        Ok(())
    }

    fn usage(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Usage> {
        Ok(self.table.get(&request)?.usage)
    }

    fn set_usage(&mut self, request: Resource<Envelope>, usage: Usage) -> wasmtime::Result<()> {
        self.table.get_mut(&request)?.usage = usage;
        Ok(())
    }

    fn metadata(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&request)?.metadata.clone())
    }

    fn note(
        &mut self,
        request: Resource<Envelope>,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        let envelope = self.table.get(&request)?;
        Ok(envelope
            .metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone()))
    }

    fn set_note(
        &mut self,
        request: Resource<Envelope>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        let metadata = &self.table.get(&request)?.metadata;
        let old = metadata
            .iter()
            .position(|(k, _)| *k == key)
            .map(|at| (at, key.len() + metadata[at].1.len()));
        let budget = self.budget()?;
        let notes = budget.note_bytes - old.map_or(0, |(_, size)| size) + key.len() + value.len();
        let total = budget.total_with(None, notes);
        if total > budget.cap {
            return Err(budget.exceed(total));
        }
        budget.note_bytes = notes;
        let metadata = &mut self.table.get_mut(&request)?.metadata;
        match old {
            Some((at, _)) => metadata[at].1 = value,
            None => metadata.push((key, value)),
        }
        Ok(())
    }

    fn drop(&mut self, _request: Resource<Envelope>) -> wasmtime::Result<()> {
        // The host lends the request and never gives it away, so a guest
        // never owns a handle to drop; the host takes the envelope back
        // from the table itself when the call ends.
        Ok(())
    }
}

impl HostState {
    /// The current call's request budget.
    fn budget(&mut self) -> wasmtime::Result<&mut RequestBudget> {
        self.request
            .as_mut()
            .ok_or_else(|| wasmtime::Error::msg("no request is being processed"))
    }

    /// Count `field` at `size` bytes against the budget.
    fn spend(&mut self, field: Field, size: usize) -> wasmtime::Result<()> {
        self.budget()?.admit(field, size)
    }
}

impl request::Host for HostState {}
