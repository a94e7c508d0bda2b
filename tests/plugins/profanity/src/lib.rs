//! A streaming stage written with the SDK that masks configured words:
//! `words = "darn, heck"` (the default) turns `Darn it` into `**** it`.
//!
//! A word is a maximal run of word characters (alphanumeric or `_`, as
//! `\w` in a regular expression); a configured word matches a whole word
//! only, case-insensitively (`darned` and `darn_it` stay), and each of its
//! characters becomes `*`. `process` masks the whole completion and
//! sets the note `profanity.masked` (how many words it masked);
//! `process_chunk` masks a stream, holding back the trailing word of each
//! chunk ([`Chunk::complete_words`]) until the next delta shows where it
//! ends, so a word split across deltas (`da` + `rn`) is still masked, and
//! the streamed text equals the plain one.

use orchestrator_plugin::{
    Chunk, ChunkOutput, InitError, Request, Stage, StageError, StreamingStage,
};
use serde::Deserialize;

/// The stage's configuration.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The words to mask, a comma-separated list (`"darn, heck"`).
    pub words: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            words: vec!["darn".into(), "heck".into()],
        }
    }
}

/// Whether `c` belongs to a word.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The stage: the configured words, lowercased.
pub struct Profanity {
    words: Vec<String>,
}

impl Profanity {
    /// `text` with every configured word masked, and how many were.
    pub fn mask(&self, text: &str) -> (String, usize) {
        let mut out = String::with_capacity(text.len());
        let mut masked = 0;
        let mut rest = text;
        while !rest.is_empty() {
            // A run of non-word characters, copied as is, then a word.
            let gap = rest.find(is_word_char).unwrap_or(rest.len());
            out.push_str(&rest[..gap]);
            rest = &rest[gap..];
            let end = rest.find(|c| !is_word_char(c)).unwrap_or(rest.len());
            let word = &rest[..end];
            if !word.is_empty() && self.words.contains(&word.to_lowercase()) {
                out.extend(word.chars().map(|_| '*'));
                masked += 1;
            } else {
                out.push_str(word);
            }
            rest = &rest[end..];
        }
        (out, masked)
    }
}

impl Stage for Profanity {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        let mut words = Vec::new();
        for word in config.words {
            if !word.chars().all(is_word_char) {
                return Err(format!("config key `words`: {word:?} is not a single word").into());
            }
            words.push(word.to_lowercase());
        }
        Ok(Profanity { words })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let (text, masked) = self.mask(&request.completion());
        request.set_completion(&text);
        request.set_notes(&[("profanity.masked", &masked)]);
        Ok(())
    }
}

impl StreamingStage for Profanity {
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError> {
        // Everything up to the last whitespace is whole words; the rest may
        // continue in the next delta (on the last chunk nothing is held).
        let (ready, held) = chunk.complete_words();
        Ok(ChunkOutput::emit(self.mask(&ready).0).with_carry(held))
    }
}

orchestrator_plugin::export_streaming_stage!(Profanity);

#[cfg(test)]
mod tests {
    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::testing::{TestRequest, params, stream};

    use super::*;

    fn stage(pairs: &[(&str, &str)]) -> Result<Profanity, String> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: Config = from_pairs(pairs).map_err(|e| e.to_string())?;
        Profanity::init(config).map_err(|e| e.to_string())
    }

    #[test]
    fn masks_whole_words_case_insensitively() {
        let stage = stage(&[]).unwrap();
        assert_eq!(
            stage.mask("Darn it, what the HECK? darned heckle darn_it heck-darn"),
            (
                "**** it, what the ****? darned heckle darn_it ****-****".into(),
                4
            )
        );
        assert_eq!(stage.mask(""), (String::new(), 0));
    }

    #[test]
    fn process_sets_the_completion_and_the_note() {
        let stage = stage(&[("words", "gosh, Drat")]).unwrap();
        let request = TestRequest::new().with_completion("Gosh. DRAT! darn");
        stage.process(&request).unwrap();
        assert_eq!(request.completion(), "****. ****! darn");
        assert_eq!(request.note("profanity.masked").as_deref(), Some("2"));
    }

    #[test]
    fn a_word_split_across_deltas_is_masked() {
        let stage = stage(&[]).unwrap();
        let out = stream(&stage, &params(), &["oh da", "rn it, ", "he", "", "ck"]).unwrap();
        assert_eq!(out.text(), "oh **** it, ****");
        assert_eq!(out.pieces, ["oh ", "**** it, ", "****"]);
        assert!(!out.stopped);
    }

    #[test]
    fn streaming_gives_the_plain_text_for_every_split() {
        let stage = stage(&[]).unwrap();
        let text = "Darn! héck, heck\tdarnit DARN";
        let whole = stage.mask(text).0;
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let deltas = [&text[..a], &text[a..b], &text[b..]];
                let out = stream(&stage, &params(), &deltas).unwrap();
                assert_eq!(out.text(), whole, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = stage(&[("words", "darn, oh no")]).err().unwrap();
        assert_eq!(err, "config key `words`: \"oh no\" is not a single word");
        let err = stage(&[("word", "darn")]).err().unwrap();
        assert!(err.starts_with("config key `word`: unknown key"), "{err}");
        assert_eq!(stage(&[("words", "")]).unwrap().mask("darn").1, 0);
    }
}
