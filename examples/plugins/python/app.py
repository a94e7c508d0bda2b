"""A `post` stage in Python: mask profanity in the completion.

World: `streaming-request-stage` of orchestrator:pipeline@0.2.2 (wit/pipeline.wit).

  * `init(config)`      reads `words` (comma separated, case-insensitive;
                        default "darn,heck"); any other key is an error.
  * `process(request)`  masks the whole completion (the answer's text)
                        through the borrowed `request` handle and sets the
                        note `profanity.masked`; it also reads the client's
                        structured chat and tools, noting the number of
                        messages in `profanity.messages` and the tools'
                        names, comma-joined, in `profanity.tools`. With
                        the store `profanity` granted
                        (`capabilities.stores`), it adds the count to the
                        counter `masked` there (shared by every request, and
                        by every replica on a Redis store) and notes the
                        running total in `profanity.total`.
  * `process-chunk(...)` masks a streamed completion piece by piece: the
                        trailing, possibly unfinished word is held back in
                        `carry` until the next chunk (or `last`) decides it.

A word is a maximal run of word characters: ASCII letters and digits, and any
non-ASCII letter that has case (its upper and lower case differ) -- the same
rule as the JavaScript example, whose engine lacks Unicode tables for
`\p{L}`. A configured word is replaced by as many `*` as it has characters
(code points), so "Heck!" -> "****!".

Build: ./build.sh (componentize-py generates the bindings on the fly; the
`wit_world` package imported below exists only inside the component, and
`componentize-py -d wit -w streaming-request-stage bindings bindings`
writes stubs of it for editors and type checkers).
"""

from typing import List, Tuple

import wit_world
from wit_world.imports import atomics, log, store
from wit_world.imports.request import Request
from wit_world.imports.streaming import ChunkContext, ChunkOutput
from componentize_py_types import Err

DEFAULT_WORDS = "darn,heck"
NOTE = "profanity.masked"
MESSAGES_NOTE = "profanity.messages"
TOOLS_NOTE = "profanity.tools"
TOTAL_NOTE = "profanity.total"
STORE = "profanity"

# Set by `init`, which the host calls once per instance before any other
# export. Only configuration lives here: per-request state goes in `carry`.
_words: frozenset = frozenset()


def _parse_words(value: str) -> frozenset:
    return frozenset(w.strip().lower() for w in value.split(",") if w.strip())


def _is_word_char(c: str) -> bool:
    if c.isascii():
        return c.isalnum()
    return c.lower() != c.upper()


def _mask(text: str) -> Tuple[str, int]:
    """Mask every configured word of `text`; return the text and the count."""
    out: List[str] = []
    count = 0
    i, n = 0, len(text)
    while i < n:
        if not _is_word_char(text[i]):
            j = i
            while j < n and not _is_word_char(text[j]):
                j += 1
            out.append(text[i:j])
        else:
            j = i
            while j < n and _is_word_char(text[j]):
                j += 1
            word = text[i:j]
            if word.lower() in _words:
                out.append("*" * len(word))
                count += 1
            else:
                out.append(word)
        i = j
    return "".join(out), count


def _split_trailing_word(text: str) -> Tuple[str, str]:
    """Split `text` into (complete part, trailing word run that may go on)."""
    i = len(text)
    while i > 0 and _is_word_char(text[i - 1]):
        i -= 1
    return text[:i], text[i:]


def _count_in_store(request: Request, count: int) -> None:
    """Add `count` to the store's counter and note the total. A store call
    that fails (not granted, or down) raises `Err` holding the `error`
    variant (`store.Error_AccessDenied()`, `store.Error_Other(value=...)`):
    noted, and the request goes on."""
    try:
        with store.open(STORE) as bucket:
            total = atomics.increment(bucket, "masked", count)
        request.set_note(TOTAL_NOTE, str(total))
    except Err as e:
        request.set_note(TOTAL_NOTE, f"unavailable: {type(e.value).__name__}")


class WitWorld(wit_world.WitWorld):
    """The exports. componentize-py looks for a class named after the world
    module (`wit_world` -> `WitWorld`) in the app module."""

    def init(self, config: List[Tuple[str, str]]) -> None:
        # `result<_, string>`: return normally for `ok`, raise Err(str) for `err`.
        global _words
        words = DEFAULT_WORDS
        for key, value in config:
            if key == "words":
                words = value
            else:
                raise Err(f"unknown config key {key!r} (this stage takes only 'words')")
        _words = _parse_words(words)
        if not _words:
            raise Err("config key 'words' names no word")

    def process(self, request: Request) -> None:
        # `request` is a *borrowed* handle: use it during this call only,
        # don't keep it and don't close it (`with request:` would drop it).
        masked, count = _mask(request.completion())
        if count:
            request.set_completion(masked)
        request.set_note(NOTE, str(count))
        if count:
            _count_in_store(request, count)
            log.emit(log.Level.DEBUG, "masked words", [("count", str(count))])
        # The chat as the client sent it: `Message` records (`role`,
        # `content`: None, `Content_Text(value=str)` or
        # `Content_Parts(value=[...])`, `tool_calls`, ...) and the `Tool`
        # records offered to the model.
        request.set_note(MESSAGES_NOTE, str(len(request.messages())))
        request.set_note(TOOLS_NOTE, ",".join(tool.name for tool in request.tools()))

    def process_chunk(
        self, context: ChunkContext, carry: str, delta: str, last: bool
    ) -> ChunkOutput:
        # A stage error would be raised as
        # `Err(wit_world.imports.types.StageError_InvalidInput("..."))`;
        # this stage has none.
        text = carry + delta
        if last:
            done, held = text, ""
        else:
            done, held = _split_trailing_word(text)
        masked, _count = _mask(done)
        # No notes from here: `process-chunk` has no request handle.
        return ChunkOutput(emit=[masked] if masked else [], carry=held, stop=False)

