//! The stage itself: [`clean`](crate::clean) and
//! [`process_chunk`](crate::process_chunk) behind the SDK's traits.

use orchestrator_plugin::{
    Chunk, ChunkOutput, InitError, Request, Stage, StageError, StreamingStage,
};

/// The `post` stage. It takes no configuration: the stop sequences come
/// with each request.
pub struct Post;

impl Stage for Post {
    type Config = ();

    fn init((): ()) -> Result<Self, InitError> {
        Ok(Post)
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let cleaned = crate::clean(&request.completion(), &request.params().stop);
        if cleaned.stopped {
            request.set_finish_reason("stop");
        }
        request.set_notes(&[
            ("post.redacted_emails", &cleaned.emails),
            ("post.redacted_keys", &cleaned.keys),
            ("post.stop_applied", &cleaned.stopped),
            ("post.trimmed_chars", &cleaned.trimmed_chars),
        ]);
        request.set_completion(&cleaned.text);
        Ok(())
    }
}

impl StreamingStage for Post {
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError> {
        let out =
            crate::process_chunk(&chunk.params().stop, &chunk.carry, &chunk.delta, chunk.last)
                .map_err(|bad| StageError::InvalidInput(bad.to_string()))?;
        let output = ChunkOutput::emit(out.emit).with_carry(out.carry);
        Ok(if out.stop { output.stopping() } else { output })
    }
}

orchestrator_plugin::export_streaming_stage!(Post);
