// A `post` stage in JavaScript: mask profanity in the completion.
//
// World: `streaming-request-stage` of orchestrator:pipeline@0.2.2
// (wit/pipeline.wit), built with ComponentizeJS (StarlingMonkey); see build.sh.
//
//   * init(config)        reads `words` (comma separated, case-insensitive;
//                         default "darn,heck"); any other key is an error.
//   * process(request)    masks the whole completion (the answer's text)
//                         through the borrowed `request` handle and sets the
//                         note `profanity.masked`; it also reads the client's
//                         structured chat and tools, noting the number of
//                         messages in `profanity.messages` and the tools'
//                         names, comma-joined, in `profanity.tools`. With
//                         the store `profanity` granted
//                         (`capabilities.stores`), it adds the count to the
//                         counter `masked` there (shared by every request,
//                         and by every replica on a Redis store) and notes
//                         the running total in `profanity.total`.
//   * processChunk(...)   masks a streamed completion piece by piece: the
//                         trailing, possibly unfinished word is held back in
//                         `carry` until the next chunk (or `last`) decides it.
//
// A word is a maximal run of word characters: ASCII letters and digits, and
// any non-ASCII letter that has case (its upper and lower case differ). Not
// `/[\p{L}\p{N}]/u`: StarlingMonkey's SpiderMonkey is built without ICU and
// rejects Unicode property escapes (a SyntaxError when the build pre-runs the
// module). A configured word is replaced by as many `*` as it has characters
// (code points), so "Heck!" -> "****!". The Python example uses the same rule.
//
// How WIT maps to JS here (ComponentizeJS / jco conventions):
//   * exports are the module's named exports, kebab-case -> camelCase
//     (`process-chunk` -> `processChunk`);
//   * imports are ES imports of '<package>/<interface>@<version>';
//   * `borrow<request>` arrives as an object with the resource's methods
//     (`completion()`, `setCompletion(s)`, `setNote(k, v)`), valid for the
//     call only;
//   * records are plain objects with camelCase fields, enums are strings
//     ('debug'), variants are `{ tag: 'invalid-input', val: '...' }`;
//   * `result<T, E>`: return T for `ok`; THROW the E value itself (a string,
//     or a `{ tag, val }` object) for `err`. Throwing an `Error` instance is
//     not converted into `err`: the call traps instead.

import { emit as log } from 'orchestrator:pipeline/log@0.2.2';
import { open } from 'wasi:keyvalue/store@0.2.0-draft2';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft2';

const DEFAULT_WORDS = 'darn,heck';
const NOTE = 'profanity.masked';
const MESSAGES_NOTE = 'profanity.messages';
const TOOLS_NOTE = 'profanity.tools';
const TOTAL_NOTE = 'profanity.total';
const STORE = 'profanity';

// Set by `init`, which the host calls once per instance before any other
// export. Only configuration lives here: per-request state goes in `carry`.
let words = new Set();

function parseWords(value) {
  return new Set(
    value
      .split(',')
      .map((w) => w.trim().toLowerCase())
      .filter((w) => w.length > 0),
  );
}

function isWordChar(c) {
  if (c < '\x80') return /[0-9A-Za-z]/.test(c);
  return c.toLowerCase() !== c.toUpperCase();
}

// Split `text` into its runs: words and the text between them.
function runs(text) {
  const out = [];
  let current = '';
  let inWord = false;
  for (const c of text) { // by code point
    const w = isWordChar(c);
    if (current && w !== inWord) {
      out.push({ text: current, word: inWord });
      current = '';
    }
    current += c;
    inWord = w;
  }
  if (current) out.push({ text: current, word: inWord });
  return out;
}

// Mask every configured word of `text`; return the text and the count.
function mask(text) {
  let count = 0;
  let masked = '';
  for (const run of runs(text)) {
    if (run.word && words.has(run.text.toLowerCase())) {
      masked += '*'.repeat(Array.from(run.text).length);
      count += 1;
    } else {
      masked += run.text;
    }
  }
  return { masked, count };
}

/** @param {[string, string][]} config */
export function init(config) {
  let value = DEFAULT_WORDS;
  for (const [key, v] of config) {
    if (key === 'words') {
      value = v;
    } else {
      // `result<_, string>`: the thrown string is the `err` payload.
      throw `unknown config key "${key}" (this stage takes only "words")`;
    }
  }
  words = parseWords(value);
  if (words.size === 0) throw 'config key "words" names no word';
}

// Add `count` to the store's counter and note the total. A store call that
// fails (not granted, or down) throws a ComponentError whose `payload` is the
// `error` variant ({ tag: 'access-denied' }, { tag: 'other', val }): noted,
// and the request goes on.
function countInStore(request, count) {
  try {
    const bucket = open(STORE);
    const total = increment(bucket, 'masked', BigInt(count));
    request.setNote(TOTAL_NOTE, String(total));
  } catch (e) {
    const tag = e && e.payload ? e.payload.tag : String(e);
    request.setNote(TOTAL_NOTE, `unavailable: ${tag}`);
  }
}

/** `request` is a borrowed handle: use it during this call only. */
export function process(request) {
  const { masked, count } = mask(request.completion());
  if (count > 0) {
    request.setCompletion(masked);
    log('debug', 'masked words', [['count', String(count)]]);
  }
  request.setNote(NOTE, String(count));
  if (count > 0) countInStore(request, count);
  // The chat as the client sent it: message records ({ role, content,
  // toolCalls, ... }, `content` undefined or { tag: 'text', val } or
  // { tag: 'parts', val: [...] }) and the tool records offered to the model.
  request.setNote(MESSAGES_NOTE, String(request.messages().length));
  request.setNote(TOOLS_NOTE, request.tools().map((tool) => tool.name).join(','));
  // Returning (undefined) is `ok`. A stage error would be
  // `throw { tag: 'invalid-input', val: '...' }`.
}

export function processChunk(context, carry, delta, last) {
  const text = carry + delta;
  let done = text;
  let held = '';
  if (!last) {
    // Hold back the trailing word run: the next delta may continue it.
    const all = runs(text);
    const tail = all[all.length - 1];
    if (tail && tail.word) {
      held = tail.text;
      done = text.slice(0, text.length - held.length);
    }
  }
  const { masked } = mask(done);
  // No notes from here: `process-chunk` has no request handle.
  return { emit: masked ? [masked] : [], carry: held, stop: false };
}
