"""Talks to the orchestrator with the official OpenAI Python SDK, unchanged.

Usage: python3 tests/openai_sdk.py http://127.0.0.1:PORT
Run by tests/sdk.rs. Exits non-zero (with a traceback) on any mismatch.
"""

import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed", max_retries=0)

models = client.models.list()
assert [m.id for m in models.data] == ["echo"], models

question = "What is backpressure? Mail me at bob@example.com"
completion = client.chat.completions.create(
    model="echo",
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": question},
    ],
    max_tokens=64,
)
choice = completion.choices[0]
assert choice.message.role == "assistant", completion
assert choice.message.content == "What is backpressure? Mail me at [redacted email]", completion
assert choice.finish_reason == "stop", completion
assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

stream = client.chat.completions.create(
    model="echo",
    messages=[{"role": "user", "content": question}],
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(pieces) == choice.message.content, pieces
assert len(pieces) > 1, pieces
assert finish == "stop"
assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens, usage

try:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as error:
    assert error.status_code == 404
    assert error.code == "model_not_found", error.body

try:
    client.chat.completions.create(model="echo", messages=[])
    raise AssertionError("empty messages were accepted")
except openai.BadRequestError as error:
    assert "messages" in error.message

print("openai sdk", openai.__version__, "ok")
