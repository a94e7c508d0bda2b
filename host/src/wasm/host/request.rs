//! The `request` resource of the current contract (0.2.x): the envelope
//! of the request being processed, lent to the guest for one `process`
//! call, and the output budget every setter is checked against.

use wasmtime::component::Resource;

use super::state::{Field, HostState, RequestBudget};
use crate::chat::ToolCall;
use crate::wasm::bindings::v2::orchestrator::pipeline::request;
use crate::wasm::bindings::v2::orchestrator::pipeline::types::{
    GenerationParams, Message, Passage, Refusal, Route, Tool, ToolCall as WitToolCall, Usage,
};
use crate::wasm::convert::{
    message_from_wit, message_to_wit, params_from_wit, params_to_wit, passage_from_wit,
    passage_to_wit, tool_call_from_wit, tool_call_to_wit, tool_from_wit, tool_to_wit,
    usage_from_wit, usage_to_wit,
};
use crate::wasm::envelope::{Envelope, json_bytes, messages_bytes};

/// The `request` resource: the envelope in the store's resource table.
/// Getters copy one field out; setters check the field against the output
/// budget and replace it. A setter over budget records the size and traps,
/// which ends the call with `output_too_large`; a setter given invalid JSON
/// traps with the reason.
impl request::HostRequest for HostState {
    fn id(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.request_id.clone())
    }

    fn messages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Message>> {
        Ok(self
            .table
            .get(&request)?
            .messages
            .iter()
            .map(message_to_wit)
            .collect())
    }

    fn set_messages(
        &mut self,
        request: Resource<Envelope>,
        messages: Vec<Message>,
    ) -> wasmtime::Result<()> {
        let messages = messages
            .into_iter()
            .map(message_from_wit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(wasmtime::Error::msg)?;
        self.spend(Field::Messages, messages_bytes(&messages))?;
        self.table.get_mut(&request)?.messages = messages;
        Ok(())
    }

    fn params(&mut self, request: Resource<Envelope>) -> wasmtime::Result<GenerationParams> {
        Ok(params_to_wit(&self.table.get(&request)?.params))
    }

    fn set_params(
        &mut self,
        request: Resource<Envelope>,
        params: GenerationParams,
    ) -> wasmtime::Result<()> {
        let params = params_from_wit(params).map_err(wasmtime::Error::msg)?;
        self.spend(Field::Params, json_bytes(&params))?;
        self.table.get_mut(&request)?.params = params;
        Ok(())
    }

    fn tools(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Tool>> {
        Ok(self
            .table
            .get(&request)?
            .tools
            .iter()
            .map(tool_to_wit)
            .collect())
    }

    fn set_tools(&mut self, request: Resource<Envelope>, tools: Vec<Tool>) -> wasmtime::Result<()> {
        let tools = tools
            .into_iter()
            .map(tool_from_wit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(wasmtime::Error::msg)?;
        self.spend(Field::Tools, json_bytes(&tools))?;
        self.table.get_mut(&request)?.tools = tools;
        Ok(())
    }

    fn passages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Passage>> {
        Ok(self
            .table
            .get(&request)?
            .passages
            .iter()
            .map(passage_to_wit)
            .collect())
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
        self.table.get_mut(&request)?.passages =
            passages.into_iter().map(passage_from_wit).collect();
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

    fn tool_calls(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<WitToolCall>> {
        Ok(self
            .table
            .get(&request)?
            .tool_calls
            .iter()
            .map(tool_call_to_wit)
            .collect())
    }

    fn set_tool_calls(
        &mut self,
        request: Resource<Envelope>,
        calls: Vec<WitToolCall>,
    ) -> wasmtime::Result<()> {
        let calls: Vec<ToolCall> = calls.into_iter().map(tool_call_from_wit).collect();
        self.spend(Field::ToolCalls, json_bytes(&calls))?;
        self.table.get_mut(&request)?.tool_calls = calls;
        Ok(())
    }

    fn refusal(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&request)?.refusal.clone())
    }

    fn set_refusal(
        &mut self,
        request: Resource<Envelope>,
        refusal: Option<String>,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Refusal, refusal.as_ref().map_or(0, String::len))?;
        self.table.get_mut(&request)?.refusal = refusal;
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
        Ok(usage_to_wit(self.table.get(&request)?.usage))
    }

    fn set_usage(&mut self, request: Resource<Envelope>, usage: Usage) -> wasmtime::Result<()> {
        self.table.get_mut(&request)?.usage = usage_from_wit(usage);
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
        Ok(note(self.table.get(&request)?, &key))
    }

    fn set_note(
        &mut self,
        request: Resource<Envelope>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.set_note_in(&request, key, value)
    }

    fn header(
        &mut self,
        request: Resource<Envelope>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        HostState::header(self, request, name)
    }

    fn client_address(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Option<String>> {
        HostState::client_address(self, request)
    }

    fn principal(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&request)?.principal.clone())
    }

    fn set_principal(
        &mut self,
        request: Resource<Envelope>,
        principal: String,
    ) -> wasmtime::Result<()> {
        HostState::set_principal(self, request, principal)
    }

    fn answer(&mut self, request: Resource<Envelope>) -> wasmtime::Result<()> {
        let envelope = self.table.get_mut(&request)?;
        // After the generation it is an answer already.
        if !envelope.generated {
            envelope.answered = true;
        }
        Ok(())
    }

    fn answered(&mut self, request: Resource<Envelope>) -> wasmtime::Result<bool> {
        Ok(self.table.get(&request)?.answered)
    }

    fn refuse(&mut self, request: Resource<Envelope>, refusal: Refusal) -> wasmtime::Result<()> {
        HostState::refuse(self, request, refusal)
    }

    fn set_response_header(
        &mut self,
        request: Resource<Envelope>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), String>> {
        HostState::set_response_header(self, request, name, value)
    }

    fn route(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Route> {
        let route = self.table.get(&request)?.route();
        Ok(Route {
            pipeline: route.pipeline.to_owned(),
            backend: route.backend.to_owned(),
            upstream_model: route.upstream_model.to_owned(),
            max_tokens_limit: route.max_tokens_limit,
        })
    }

    fn fingerprint(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&request)?.fingerprint().to_vec())
    }

    fn prompt_estimate(&mut self, request: Resource<Envelope>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&request)?.prompt_estimate())
    }

    fn drop(&mut self, _request: Resource<Envelope>) -> wasmtime::Result<()> {
        // The host lends the request and never gives it away, so a guest
        // never owns a handle to drop; the host takes the envelope back
        // from the table itself when the call ends.
        Ok(())
    }
}

/// The value of the note `key` of `envelope`.
pub(super) fn note(envelope: &Envelope, key: &str) -> Option<String> {
    envelope
        .metadata
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
}

impl HostState {
    /// The current call's request budget.
    fn budget(&mut self) -> wasmtime::Result<&mut RequestBudget> {
        self.request
            .as_mut()
            .ok_or_else(|| wasmtime::Error::msg("no request is being processed"))
    }

    /// Count `field` at `size` bytes against the budget.
    pub(super) fn spend(&mut self, field: Field, size: usize) -> wasmtime::Result<()> {
        self.budget()?.admit(field, size)
    }

    /// Set the note `key` of the envelope behind `request` (of either
    /// contract), within the budget.
    pub(super) fn set_note_in<T: AsMut<Envelope> + AsRef<Envelope> + 'static>(
        &mut self,
        request: &Resource<T>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        let metadata = &self.table.get(request)?.as_ref().metadata;
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
        let metadata = &mut self.table.get_mut(request)?.as_mut().metadata;
        match old {
            Some((at, _)) => metadata[at].1 = value,
            None => metadata.push((key, value)),
        }
        Ok(())
    }
}

impl AsRef<Envelope> for Envelope {
    fn as_ref(&self) -> &Envelope {
        self
    }
}

impl AsMut<Envelope> for Envelope {
    fn as_mut(&mut self) -> &mut Envelope {
        self
    }
}

impl request::Host for HostState {}
