//! The span queue in front of the OTLP exporter: bounded, never blocking a
//! request, and counting what it drops.
//!
//! Lifecycle: [`QueueProcessor::start`] spawns one export thread that owns
//! the exporter and a current-thread tokio runtime (the OTLP client is
//! async and needs a reactor; owning one keeps export off the runtime that
//! serves requests). A span that ends is pushed onto a bounded channel with
//! `try_send`: when the channel is full, the span is dropped and counted
//! (`reason="queue_full"`). The thread sends a batch of up to
//! [`MAX_BATCH`] spans when it has that many or every [`BATCH_DELAY`];
//! an export that fails or times out loses its batch, counted as
//! `reason="export_failed"`, and the next batch is tried as usual. A slow or
//! dead collector therefore costs requests nothing: the queue fills, spans
//! are dropped and counted. At shutdown the thread exports what is queued
//! (within the caller's timeout) and stops.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus::IntCounter;

/// The most spans sent in one export.
pub const MAX_BATCH: usize = 512;
/// The longest a span waits in the queue before its batch is sent.
pub const BATCH_DELAY: Duration = Duration::from_millis(200);

enum Message {
    Span(Box<SpanData>),
    Resource(Resource),
    Flush(mpsc::Sender<OTelSdkResult>),
    Shutdown(mpsc::Sender<OTelSdkResult>),
}

/// A [`SpanProcessor`] that queues ended spans for a background export
/// thread (see the module docs).
#[derive(Debug)]
pub struct QueueProcessor {
    queue: SyncSender<Message>,
    queue_full: IntCounter,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl QueueProcessor {
    /// Start the export thread for `exporter`, with room for `capacity`
    /// spans; drops are counted in `queue_full` and `export_failed`.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        capacity: usize,
        queue_full: IntCounter,
        export_failed: IntCounter,
    ) -> std::io::Result<QueueProcessor> {
        let (queue, receiver) = mpsc::sync_channel(capacity);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export_loop(exporter, &runtime, &receiver, &export_failed))?;
        Ok(QueueProcessor {
            queue,
            queue_full,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Send a control message and wait up to `timeout` for its answer.
    fn control(
        &self,
        message: impl FnOnce(mpsc::Sender<OTelSdkResult>) -> Message,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (ack, answer) = mpsc::channel();
        // Blocking only if the queue is full, and only the caller of a
        // flush or a shutdown (never a request).
        self.queue
            .send(message(ack))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answer
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))?
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.queue_full.inc(),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Message::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let result = self.control(Message::Shutdown, timeout);
        if result.is_ok() {
            let _ = thread.join();
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.queue.try_send(Message::Resource(resource.clone()));
    }
}

/// The export thread: batch, export, repeat, until shut down or the
/// processor is gone.
fn export_loop<E: SpanExporter>(
    mut exporter: E,
    runtime: &tokio::runtime::Runtime,
    receiver: &Receiver<Message>,
    export_failed: &IntCounter,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let send = |exporter: &E, batch: &mut Vec<SpanData>| -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let spans = std::mem::take(batch);
        let count = spans.len() as u64;
        let result = runtime.block_on(exporter.export(spans));
        if let Err(error) = &result {
            export_failed.inc_by(count);
            tracing::debug!(%error, spans = count, "trace export failed");
        }
        result
    };
    let mut due = Instant::now() + BATCH_DELAY;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(wait) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= MAX_BATCH {
                    let _ = send(&exporter, &mut batch);
                    due = Instant::now() + BATCH_DELAY;
                }
            }
            Ok(Message::Resource(resource)) => exporter.set_resource(&resource),
            Ok(Message::Flush(ack)) => {
                let _ = ack.send(send(&exporter, &mut batch));
            }
            Ok(Message::Shutdown(ack)) => {
                // What is queued behind the shutdown is lost with the thread.
                let result = send(&exporter, &mut batch).and(exporter.shutdown());
                let _ = ack.send(result);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = send(&exporter, &mut batch);
                due = Instant::now() + BATCH_DELAY;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = send(&exporter, &mut batch);
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}
