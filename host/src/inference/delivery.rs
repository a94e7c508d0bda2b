//! How an opened generation reaches the pipeline: a streamed one as a task
//! pumping its events into a channel ([`upstream_task`]), a plain one read
//! whole when the pipeline first asks for its events ([`whole_answer`]);
//! either opened on its backend or, failing that, its failover
//! ([`open_any`]), and counted when it ends.
//!
//! Lifecycle steps 4–5 of the [module docs](super) happen here.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, StartedStream};
use super::generation::{BackendError, Ending, Event, GenerateRequest};
use super::protocol::AttemptError;
use crate::metrics::UpstreamOutcome;
use crate::trace::{Attribute, Trace};

/// The generation task of a streamed generation: open (retries,
/// failover), then pump events.
pub(super) async fn upstream_task(
    primary: Arc<Backend>,
    failover: Option<Arc<Backend>>,
    request: GenerateRequest,
    opened: oneshot::Sender<Result<String, BackendError>>,
    events: mpsc::Sender<Result<Event, BackendError>>,
) {
    let mut opened = opened;
    // Dropping `open_any` (the caller gave up) settles nothing: a probe
    // admission is given back by its guard.
    let attempt = tokio::select! {
        biased;
        () = opened.closed() => return,
        attempt = open_any(primary, failover, &request) => attempt,
    };
    match attempt {
        Ok((backend, open)) => {
            if opened.send(Ok(backend.name.clone())).is_err() {
                backend.metrics.outcome(UpstreamOutcome::Cancelled).inc();
                return;
            }
            backend.pump(open, &request, events).await;
        }
        Err(error) => {
            let _ = opened.send(Err(error));
        }
    }
}

/// A plain generation (no attempt streamed): opened and read whole on the
/// task that awaits it (the pipeline's, when it collects the answer) — no
/// generation task, no hand-off. Dropping the future drops the upstream
/// request, as dropping a stream's [`TokenStream`] does; once it resolves,
/// the generation is over and counted, and the events are in the channel.
///
/// [`TokenStream`]: super::TokenStream
pub(super) async fn whole_answer(
    primary: Arc<Backend>,
    failover: Option<Arc<Backend>>,
    request: GenerateRequest,
) -> Result<(String, mpsc::Receiver<Result<Event, BackendError>>), BackendError> {
    let request = &request;
    let (backend, open) = open_any(primary, failover, request).await?;
    debug_assert!(!open.streamed, "a streamed attempt is pumped by a task");
    // A plain answer is at most three events (text, extras, end: see
    // `whole_answer_events`), so pumping it never waits on the channel.
    let (events, received) = mpsc::channel(WHOLE_ANSWER_EVENTS);
    backend.pump(open, request, events).await;
    Ok((backend.name.clone(), received))
}

/// Room for the events of a plain answer.
const WHOLE_ANSWER_EVENTS: usize = 4;

/// Open `primary`, or — if it fails for a reason of its own — `failover`:
/// the backend that gave the first event, with its stream, or the first
/// error.
async fn open_any(
    primary: Arc<Backend>,
    failover: Option<Arc<Backend>>,
    request: &GenerateRequest,
) -> Result<(Arc<Backend>, StartedStream), BackendError> {
    let mut first_error: Option<BackendError> = None;
    for backend in std::iter::once(primary).chain(failover) {
        match backend.open(request).await {
            Ok(open) => return Ok((backend, open)),
            Err(failure) => {
                let error = failure.error;
                if let Some(first) = &first_error {
                    tracing::warn!(backend = %backend.name, request_id = %request.request_id, trace_id = %request.trace, %error, after = %first, "failover backend failed too");
                } else {
                    tracing::warn!(backend = %backend.name, request_id = %request.request_id, trace_id = %request.trace, %error, "backend failed");
                }
                first_error.get_or_insert(error);
                if !failure.backend_at_fault {
                    // The request itself was refused (a 4xx): another
                    // backend would refuse it too.
                    break;
                }
            }
        }
    }
    Err(first_error.unwrap_or_else(|| BackendError::Failed {
        backend: "?".into(),
        reason: "no backend tried".into(),
    }))
}

impl Backend {
    /// Forward events until the end, an error, a stall, or the receiver
    /// going away.
    async fn pump(
        &self,
        mut open: StartedStream,
        request: &GenerateRequest,
        events: mpsc::Sender<Result<Event, BackendError>>,
    ) {
        let mut chunks = 0u64;
        // A plain answer's text tokens, counted here in case the upstream
        // reports no usage (a stream's are its chunks).
        let mut text_tokens = 0usize;
        // What the answer may hold: an upstream that ignores `max_tokens`
        // is cut there, not buffered without limit.
        let max_bytes = self.max_answer_bytes(request);
        let mut bytes = 0usize;
        let trace = open.trace.clone();
        // Only with `record_content`: the completion, for the span.
        let mut completion = trace.records_content().then(String::new);
        // Moved, not copied: a plain answer's text is all in it.
        let first = std::mem::replace(&mut open.first, Event::Delta(String::new()));
        let mut next = Some(Ok(first));
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => {
                    let Some(timeout) = self.request_timeout(request.deadline) else {
                        trace.fail("timeout", "the request's deadline passed");
                        trace.end();
                        self.end(UpstreamOutcome::Timeout, chunks, None);
                        let _ = events
                            .send(Err(self.timeout_error("the request's deadline passed")))
                            .await;
                        return;
                    };
                    tokio::select! {
                        biased;
                        () = events.closed() => {
                            trace.set([Attribute::new("orchestrator.outcome", "cancelled")]);
                            trace.end();
                            self.end(UpstreamOutcome::Cancelled, chunks, None);
                            return;
                        }
                        item = tokio::time::timeout(timeout, open.events.next()) => match item {
                            Err(_) => Err(AttemptError::Timeout(format!(
                                "no token for {} ms", timeout.as_millis()
                            ))),
                            Ok(None) => Err(AttemptError::Protocol("the stream ended early".into())),
                            Ok(Some(item)) => item,
                        },
                    }
                }
            };
            match item {
                Ok(event @ (Event::Delta(_) | Event::Extra(_))) => {
                    if chunks > 0 && open.streamed {
                        self.metrics
                            .itl
                            .observe(open.last_event.elapsed().as_secs_f64());
                    }
                    open.last_event = Instant::now();
                    chunks += 1;
                    if let (Some(completion), Event::Delta(text)) = (&mut completion, &event) {
                        completion.push_str(text);
                    }
                    if let (false, Event::Delta(text)) = (open.streamed, &event) {
                        text_tokens += orchestrator_text::count_tokens(text);
                    }
                    bytes += match &event {
                        Event::Delta(text) => text.len(),
                        Event::Extra(extra) => {
                            extra
                                .tool_calls
                                .iter()
                                .map(|c| {
                                    // Every piece counts, a new call's
                                    // entry too.
                                    16 + c.arguments.len()
                                        + c.name.as_ref().map_or(0, String::len)
                                        + c.id.as_ref().map_or(0, String::len)
                                })
                                .sum::<usize>()
                                + extra.refusal.as_ref().map_or(0, String::len)
                                + extra.logprobs.as_ref().map_or(0, |l| l.to_string().len())
                        }
                        Event::End(_) => 0,
                    };
                    if bytes > max_bytes {
                        // Cut as a `length` answer; the upstream request is
                        // dropped (cancelled) on return.
                        tracing::warn!(
                            backend = %self.name,
                            bytes,
                            max_bytes,
                            "the upstream sent more than the request's max_tokens allow; the answer is cut"
                        );
                        let mut ending = Ending {
                            finish_reason: Some("length".into()),
                            usage: None,
                            response_id: None,
                        };
                        let mut tokens = chunks;
                        if let (false, Event::Delta(mut text)) = (open.streamed, event) {
                            // A plain answer's text is all in one event:
                            // what fits is kept.
                            let mut fits = text.len().saturating_sub(bytes - max_bytes);
                            while !text.is_char_boundary(fits) {
                                fits -= 1;
                            }
                            text.truncate(fits);
                            let counted = orchestrator_text::count_tokens(&text);
                            tokens = counted as u64;
                            ending.usage = Some((
                                request.prompt_tokens(),
                                u32::try_from(counted).unwrap_or(u32::MAX),
                            ));
                            let _ = events.send(Ok(Event::Delta(text))).await;
                        }
                        trace_ending(&trace, &ending, tokens, completion.take());
                        self.end(UpstreamOutcome::Ok, tokens, Some(false));
                        let _ = events.send(Ok(Event::End(ending))).await;
                        return;
                    }
                    if events.send(Ok(event)).await.is_err() {
                        trace.set([Attribute::new("orchestrator.outcome", "cancelled")]);
                        trace.end();
                        self.end(UpstreamOutcome::Cancelled, chunks, None);
                        return;
                    }
                }
                Ok(Event::End(mut ending)) => {
                    ending.usage = self.sane_usage(ending.usage, request);
                    if ending.usage.is_none() && !open.streamed {
                        // Counted as the shared tokenizer counts, as for
                        // `echo` (a stream's count is its chunks).
                        let counted = u32::try_from(text_tokens).unwrap_or(u32::MAX);
                        ending.usage = Some((request.prompt_tokens(), counted));
                    }
                    let tokens = ending.usage.map_or(chunks, |(_, c)| u64::from(c));
                    trace_ending(&trace, &ending, tokens, completion.take());
                    self.end(UpstreamOutcome::Ok, tokens, Some(false));
                    let _ = events.send(Ok(Event::End(ending))).await;
                    return;
                }
                Err(error) => {
                    trace.fail(error.outcome().label(), format!("{error:?}"));
                    trace.end();
                    self.end(error.outcome(), chunks, Some(true));
                    let _ = events.send(Err(error.into_backend_error(&self.name))).await;
                    return;
                }
            }
        }
    }

    /// Record how a generation that had its first token ended: `failed`
    /// for the breaker, `None` when nothing was learnt about the backend
    /// (cancelled).
    pub(super) fn end(&self, outcome: UpstreamOutcome, tokens: u64, failed: Option<bool>) {
        self.metrics.outcome(outcome).inc();
        self.metrics.tokens.inc_by(tokens);
        if let Some(failed) = failed {
            self.breaker.record(failed);
        }
    }
}

/// Finish an attempt's span with what the upstream said at the end.
pub(super) fn trace_ending(
    trace: &Trace,
    ending: &Ending,
    tokens: u64,
    completion: Option<String>,
) {
    if !trace.is_recording() {
        return;
    }
    let mut attributes = vec![
        Attribute::new("orchestrator.outcome", "ok"),
        Attribute::new("gen_ai.usage.output_tokens", tokens as i64),
    ];
    if let Some(reason) = &ending.finish_reason {
        attributes.push(Attribute::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(
                vec![opentelemetry::StringValue::from(reason.clone())].into(),
            ),
        ));
    }
    if let Some((input, _)) = ending.usage {
        attributes.push(Attribute::new(
            "gen_ai.usage.input_tokens",
            i64::from(input),
        ));
    }
    if let Some(id) = &ending.response_id {
        attributes.push(Attribute::new("gen_ai.response.id", id.clone()));
    }
    if let Some(completion) = completion {
        attributes.push(Attribute::new("gen_ai.completion", completion));
    }
    trace.set(attributes);
    trace.end();
}
