//! The stage itself: [`chunks`](crate::chunks) and
//! [`process_chunk`](crate::process_chunk) behind the SDK's traits.

use orchestrator_plugin::{
    Chunk, ChunkOutput, InitError, Request, Stage, StageError, StreamingStage,
};
use serde::Deserialize;

use crate::DEFAULT_CHUNK_TOKENS;

/// The `stream` stage's configuration.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Tokens per streamed piece (at least 1).
    pub chunk_tokens: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
        }
    }
}

/// The `stream` stage. Every instance gets the same configuration, so any
/// instance may serve any chunk of a stream.
pub struct Stream {
    chunk_tokens: usize,
}

impl Stage for Stream {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.chunk_tokens == 0 {
            return Err("config key `chunk_tokens`: must be at least 1".into());
        }
        Ok(Stream {
            chunk_tokens: config.chunk_tokens,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let chunks = crate::chunks(&request.completion(), self.chunk_tokens);
        request.set_notes(&[("stream.chunks", &chunks.len())]);
        request.set_chunks(&chunks);
        Ok(())
    }
}

impl StreamingStage for Stream {
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError> {
        let out = crate::process_chunk(self.chunk_tokens, &chunk.carry, &chunk.delta, chunk.last);
        Ok(ChunkOutput {
            emit: out.emit,
            carry: out.carry,
            stop: false,
        })
    }
}

orchestrator_plugin::export_streaming_stage!(Stream);
