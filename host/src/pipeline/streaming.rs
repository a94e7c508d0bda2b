//! Token streaming: a request whose generation streams ([`Streaming`]),
//! its tokens passed through the `process-chunk` of the streaming stages
//! after the one that started it, and what the last of them emits handed
//! to the client as it comes (see the [module docs](super)).
//!
//! Owns the order of chunk calls and the end of a streamed request
//! (flushing the stages, running the plain stages after them, observing
//! the request); the calls themselves go through the stages' permits and
//! instance policy ([`super::call`]).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::call;
use super::error::RunError;
use super::stage::{BackendWait, Delivery, Job};
use super::stage::{Route, Shared};
use crate::chat::Usage;
use crate::inference::{
    BackendError, Collector, Ending, Event, ExtraDelta, TokenStream, finish_reason,
};
use crate::metrics::{ErrorType, Outcome};
use crate::store::Stores;
use crate::trace::{Attribute, Trace};
use crate::wasm::{
    CallError, ChunkContext, ChunkOutput, Envelope, Instance, Plugin, params_to_wit,
};

/// Most bytes of deltas passed through the streaming stages as one.
const MAX_COALESCED_BYTES: usize = 16 * 1024;

/// One streaming stage of a [`Streaming`] request.
struct ChunkStage {
    index: usize,
    plugin: Arc<Plugin>,
    carry: String,
    /// Time spent in its chunk calls.
    spent: Duration,
    /// Its span: the chunk calls summarised (no span per chunk).
    trace: Trace,
    /// Chunk calls, bytes passed in (deltas) and out (emitted).
    chunks: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl ChunkStage {
    /// End the stage's span with the summary of its chunk calls.
    fn close_span(&self) {
        self.trace.set([
            Attribute::new("orchestrator.chunks", self.chunks as i64),
            Attribute::new("orchestrator.chunk_bytes_in", self.bytes_in as i64),
            Attribute::new("orchestrator.chunk_bytes_out", self.bytes_out as i64),
            Attribute::new(
                "orchestrator.chunk_call_ms",
                self.spent.as_secs_f64() * 1000.0,
            ),
            Attribute::new("orchestrator.held_back_bytes", self.carry.len() as i64),
        ]);
        self.trace.end();
    }
}

/// An item of a [`Streaming`] request.
#[derive(Debug)]
pub enum StreamItem {
    /// Text for the client.
    Delta(String),
    /// Output that is not text (tool-call pieces, a refusal, log
    /// probabilities), passed on as the backend sent it.
    Extra(ExtraDelta),
    /// The request is complete: the final envelope (its `completion` is
    /// everything sent as deltas, unless a plain stage changed it).
    Done(Box<Envelope>),
}

/// A request whose generation is streaming (see the module docs). Pull
/// with [`next`](Self::next); drop to cancel.
pub struct Streaming {
    /// `None` once the plain stages after the streaming ones took it.
    job: Option<Job>,
    tokens: Option<TokenStream>,
    /// An event taken from `tokens` ahead of time (while coalescing deltas).
    lookahead: Option<Result<Event, BackendError>>,
    /// Index of the stage that started the generation.
    source: usize,
    chunk_stages: Vec<ChunkStage>,
    /// Index of the first stage that does not stream (or the stage count).
    rest_from: usize,
    context: ChunkContext,
    deadline: Instant,
    admitted: Instant,
    /// The request's time waiting for the backend (for the overhead).
    backend_wait: BackendWait,
    pending: std::collections::VecDeque<StreamItem>,
    /// What the streaming stages emitted: the completion so far.
    text: String,
    /// Where each piece sent to the client ends in `text` (the text is held
    /// once; the final envelope's `chunks` are cut from it).
    piece_ends: Vec<usize>,
    /// What the generation produced besides text.
    extras: Collector,
    ending: Ending,
    stopped: bool,
    finished: bool,
    /// The request's pipeline.
    route: Arc<Route>,
    /// The key-value stores of the request's configuration.
    stores: Arc<Stores>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Streaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streaming")
            .field("request_id", &self.context.request_id)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Streaming {
    /// The stream of `job`, whose stage `job.stage - 1` started the
    /// generation `tokens`.
    pub(super) fn new(mut job: Job, tokens: TokenStream) -> Streaming {
        let route = job.route.clone();
        let shared = job.snapshot.shared.clone();
        let stores = job.snapshot.stores().clone();
        let mut chunk_stages = Vec::new();
        let mut rest_from = route.stages.len();
        for index in job.stage..route.stages.len() {
            let stage = &route.stages[index];
            let plugin = stage.plugin_owned();
            if !plugin.streams() {
                rest_from = index;
                break;
            }
            stage.metrics.requests.inc();
            plugin.count_streamed_request();
            job.ran(index, plugin.finishes());
            let trace = stage.open_span(
                &job.trace,
                &plugin,
                &job.envelope.request_id,
                None,
                Attribute::new("orchestrator.streaming", true),
            );
            chunk_stages.push(ChunkStage {
                index,
                plugin,
                carry: String::new(),
                spent: Duration::ZERO,
                trace,
                chunks: 0,
                bytes_in: 0,
                bytes_out: 0,
            });
        }
        Streaming {
            context: ChunkContext {
                request_id: job.envelope.request_id.clone(),
                params: params_to_wit(&job.envelope.params),
            },
            deadline: job.deadline,
            admitted: job.admitted,
            backend_wait: job.backend_wait.clone(),
            tokens: Some(tokens),
            lookahead: None,
            source: job.stage.saturating_sub(1),
            chunk_stages,
            rest_from,
            pending: Default::default(),
            text: String::new(),
            piece_ends: Vec::new(),
            extras: Collector::default(),
            ending: Ending::default(),
            stopped: false,
            finished: false,
            job: Some(job),
            route,
            stores,
            shared,
        }
    }

    /// When the request must be answered.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The response headers the stages set before the stream started.
    pub fn response_headers(&self) -> &[(String, String)] {
        self.job
            .as_ref()
            .map_or(&[], |job| job.envelope.response_headers.as_slice())
    }

    /// The request as the stages left it when the stream started (`None`
    /// once the stream is complete).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.job.as_ref().map(|job| &job.envelope)
    }

    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.context.request_id
    }

    /// The next piece of text for the client, then the final envelope,
    /// then `None`; or the error that ended the request.
    pub async fn next(&mut self) -> Option<Result<StreamItem, RunError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.finished {
                return None;
            }
            let next = match (self.lookahead.take(), self.tokens.as_mut()) {
                (Some(event), _) => Some(Ok(Some(event))),
                (None, Some(tokens)) => {
                    let waiting = Instant::now();
                    let next = tokio::time::timeout_at(self.deadline.into(), tokens.next()).await;
                    self.backend_wait.add(waiting.elapsed());
                    Some(next)
                }
                (None, None) => None,
            };
            let step = match next {
                Some(next) => match next {
                    Err(_) | Ok(None) => Err(self.timeout()),
                    Ok(Some(Err(error))) => {
                        let stage = &self.route.stages[self.source];
                        stage.metrics.errors(error.error_type()).inc();
                        Err(RunError::Stage {
                            stage: stage.name(),
                            error: CallError::new(error.error_type(), error.to_string()),
                        })
                    }
                    Ok(Some(Ok(Event::Delta(mut delta)))) => {
                        // Deltas that have already arrived go through the
                        // stages together: fewer chunk calls when the
                        // backend is faster than the stages.
                        if let Some(tokens) = self.tokens.as_mut() {
                            while delta.len() < MAX_COALESCED_BYTES {
                                match tokens.try_next() {
                                    Some(Ok(Event::Delta(more))) => delta.push_str(&more),
                                    Some(other) => {
                                        self.lookahead = Some(other);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                        }
                        self.push_through(0, vec![delta]).await
                    }
                    Ok(Some(Ok(Event::Extra(extra)))) => {
                        self.extras.extra(&extra);
                        if self.rest_from == self.route.stages.len() {
                            self.pending.push_back(StreamItem::Extra(extra));
                        }
                        Ok(())
                    }
                    Ok(Some(Ok(Event::End(ending)))) => {
                        self.ending = ending;
                        self.tokens = None;
                        Ok(())
                    }
                },
                None => self.finish().await,
            };
            if let Err(error) = step {
                if let Some(job) = self.job.as_mut() {
                    // The client got 200 and the stream's error event.
                    job.failed(200);
                }
                self.end(error.outcome());
                return Some(Err(error));
            }
        }
    }

    fn timeout(&self) -> RunError {
        RunError::Timeout(self.deadline.saturating_duration_since(self.admitted))
    }

    /// Pass `pieces` through the streaming stages from `from` on.
    async fn push_through(&mut self, from: usize, mut pieces: Vec<String>) -> Result<(), RunError> {
        for k in from..self.chunk_stages.len() {
            let mut out = Vec::new();
            for piece in pieces {
                let output = self.chunk_call(k, piece, false).await?;
                out.extend(output.emit);
                if output.stop {
                    // Cancel the generation; the stages after `k` still get
                    // what `k` emitted, and every stage is flushed.
                    self.tokens = None;
                    self.stopped = true;
                    break;
                }
            }
            pieces = out;
        }
        for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
            self.text.push_str(&piece);
            if self.rest_from == self.route.stages.len() {
                self.piece_ends.push(self.text.len());
                self.pending.push_back(StreamItem::Delta(piece));
            }
        }
        Ok(())
    }

    /// One `process-chunk` call of streaming stage `k`, on an instance of
    /// the version the stream started on.
    async fn chunk_call(
        &mut self,
        k: usize,
        delta: String,
        last: bool,
    ) -> Result<ChunkOutput, RunError> {
        let stage = &mut self.chunk_stages[k];
        stage.chunks += 1;
        stage.bytes_in += delta.len() as u64;
        let carry = std::mem::take(&mut stage.carry);
        let index = stage.index;
        let runtime = self.route.stages[index].clone();
        // The wait for a permit ends with the request's deadline: a busy
        // stage makes the request late, it is not the stage's failure.
        let permit = match tokio::time::timeout_at(self.deadline.into(), runtime.permit()).await {
            Ok(permit) => permit?,
            Err(_) => return Err(self.timeout()),
        };
        let started = Instant::now();
        let remaining = self.deadline.saturating_duration_since(started);
        if remaining.is_zero() {
            return Err(self.timeout());
        }
        let stage_timeout = Duration::from_millis(runtime.settings.timeout_ms);
        let timeout = stage_timeout.min(remaining);
        let result = {
            let stage = &self.chunk_stages[k];
            let (context, trace, stores) = (&self.context, &stage.trace, &self.stores);
            call::on_instance(
                &runtime,
                &stage.plugin,
                None,
                async |live: &mut Instance| {
                    live.set_request(&context.request_id, trace.clone());
                    live.set_stores(stores);
                    live.process_chunk(context, &carry, &delta, last, timeout)
                        .await
                },
            )
            .await
        };
        drop(permit);
        let stage = &mut self.chunk_stages[k];
        stage.spent += started.elapsed();
        let output = match result {
            Ok(output) => output,
            Err(error) => {
                runtime.metrics.errors(error.error_type).inc();
                tracing::debug!(stage = runtime.name(), request_id = %self.context.request_id, trace_id = %stage.trace, %error, "chunk failed");
                stage
                    .trace
                    .fail(error.error_type.label(), error.to_string());
                // As for `process`: a call cut short by the request's
                // remaining time says nothing about the plugin.
                let cut_by_request =
                    timeout < stage_timeout && error.error_type == ErrorType::Timeout;
                if error.error_type.counts_against_stage() && !cut_by_request {
                    self.settle_breaker(index, true);
                }
                return Err(RunError::Stage {
                    stage: runtime.name(),
                    error,
                });
            }
        };
        stage.bytes_out += output.emit.iter().map(|e| e.len() as u64).sum::<u64>();
        stage.carry.clone_from(&output.carry);
        Ok(output)
    }

    /// Tell stage `index`'s breaker how the stream went there.
    fn settle_breaker(&mut self, index: usize, failed: bool) {
        if let Some(job) = self.job.as_mut() {
            job.settle(index, failed);
        }
    }

    /// The generation ended: flush the streaming stages, run the plain
    /// stages after them, and queue the final envelope.
    async fn finish(&mut self) -> Result<(), RunError> {
        for k in 0..self.chunk_stages.len() {
            let output = self.chunk_call(k, String::new(), true).await?;
            self.push_through(k + 1, output.emit).await?;
        }
        let indices: Vec<usize> = self.chunk_stages.iter().map(|s| s.index).collect();
        for (stage, index) in self.chunk_stages.iter().zip(&indices) {
            self.route.stages[*index]
                .metrics
                .duration
                .observe(stage.spent.as_secs_f64());
            stage
                .trace
                .set([Attribute::new("orchestrator.outcome", "ok")]);
            stage.close_span();
        }
        for index in indices {
            self.settle_breaker(index, false);
        }
        let Some(mut job) = self.job.take() else {
            return Err(RunError::ShuttingDown);
        };
        let envelope = &mut job.envelope;
        envelope.completion = std::mem::take(&mut self.text);
        (envelope.tool_calls, envelope.refusal, envelope.logprobs) = self.extras.take_extras();
        envelope.finish_reason = if self.stopped {
            "stop".to_string()
        } else {
            finish_reason(self.ending.finish_reason.as_deref()).to_string()
        };
        let (prompt_tokens, completion_tokens) = self.ending.usage.unwrap_or_else(|| {
            (
                envelope.prompt_tokens(),
                self.piece_ends.len() as u32 + u32::from(!envelope.tool_calls.is_empty()),
            )
        });
        envelope.usage = Usage {
            prompt_tokens,
            completion_tokens,
        };
        // Leave the streaming stages.
        while job.stage < self.rest_from {
            job.leave_stage();
        }
        let envelope = if self.rest_from < self.route.stages.len() {
            // Plain stages follow: run them as usual (a generation one of
            // them starts is collected), then stream their result.
            job.streaming = false;
            let ran = tokio::time::timeout_at(self.deadline.into(), call::run_stages(job));
            let envelope = match Box::pin(ran).await {
                Err(_) => return Err(self.timeout()),
                Ok(Err(error)) => return Err(error),
                Ok(Ok(Delivery::Done(envelope))) => match envelope.refused {
                    Some(refusal) => return Err(RunError::Refused(refusal)),
                    None => envelope,
                },
                // Not handed off: the job no longer asks for a stream.
                Ok(Ok(Delivery::Stream(job, tokens))) => {
                    Box::pin(Streaming::new(*job, tokens).collect()).await?
                }
            };
            let pieces = if envelope.chunks.is_empty() {
                vec![envelope.completion.clone()]
            } else {
                envelope.chunks.clone()
            };
            self.pending.extend(
                pieces
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(StreamItem::Delta),
            );
            envelope
        } else {
            let mut envelope = job.take_envelope();
            envelope.chunks = cut(&envelope.completion, &self.piece_ends);
            self.piece_ends = Vec::new();
            job.finish(&envelope);
            envelope
        };
        let outcome = envelope.outcome();
        self.pending.push_back(StreamItem::Done(Box::new(envelope)));
        self.end(outcome);
        Ok(())
    }

    fn end(&mut self, outcome: Outcome) {
        if !self.finished {
            self.finished = true;
            for stage in &self.chunk_stages {
                stage.close_span();
            }
            self.tokens = None;
            if let Some(job) = self.job.as_mut() {
                // Cut short: what the finish calls learn is what was
                // delivered.
                let prompt_tokens = job.envelope.prompt_tokens();
                job.envelope.usage = Usage {
                    prompt_tokens: self.ending.usage.map_or(prompt_tokens, |(p, _)| p),
                    completion_tokens: orchestrator_text::count_tokens(&self.text) as u32,
                };
            }
            self.job = None;
            self.shared.requests.observe(
                outcome,
                self.admitted.elapsed(),
                self.backend_wait.total(),
            );
        }
    }

    /// Collect the whole request (for a caller that wants one answer).
    pub async fn collect(mut self) -> Result<Envelope, RunError> {
        while let Some(item) = self.next().await {
            if let StreamItem::Done(envelope) = item? {
                return Ok(*envelope);
            }
        }
        Err(RunError::ShuttingDown)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // The client went away before the end: the generation is cancelled
        // with `tokens`, the reservations released with `job`.
        self.end(Outcome::Cancelled);
    }
}

/// `text` cut into the pieces ending at `ends` (increasing offsets at char
/// boundaries, the last one `text.len()`).
fn cut(text: &str, ends: &[usize]) -> Vec<String> {
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let piece = text.get(start..end).unwrap_or_default().to_string();
            start = end;
            piece
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pieces_are_cut_from_the_text_at_their_ends() {
        let text = "héllo, wörld";
        let ends = [3, 8, text.len()];
        assert_eq!(super::cut(text, &ends), ["hé", "llo, ", "wörld"]);
        assert!(super::cut("", &[]).is_empty());
    }
}
