"""Tool calls and structured output with the official OpenAI Python SDK,
unchanged, through the host's default pipeline to a scripted upstream that
calls `get_weather` (tests/common/upstream.rs, `Script::Agent`).

Usage: python3 tests/openai_sdk_tools.py http://127.0.0.1:PORT MODEL
Run by tests/sdk.rs. Exits non-zero (with a traceback) on any mismatch.
"""

import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed", max_retries=0)
model = sys.argv[2]

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
messages = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "What is the weather in Paris?"},
]

# Plain: the tool call, whole.
completion = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="auto")
choice = completion.choices[0]
assert choice.finish_reason == "tool_calls", completion
call = choice.message.tool_calls[0]
assert call.id == "call_abc123" and call.type == "function", call
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call

# Streamed: the arguments reassembled from the deltas, as the SDK's users do.
stream = client.chat.completions.create(model=model, messages=messages, tools=tools, stream=True)
calls, finish = {}, None
for chunk in stream:
    for c in chunk.choices:
        for piece in c.delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            if piece.id:
                entry["id"] = piece.id
            if piece.function and piece.function.name:
                entry["name"] += piece.function.name
            if piece.function and piece.function.arguments:
                entry["arguments"] += piece.function.arguments
        if c.finish_reason:
            finish = c.finish_reason
assert finish == "tool_calls", finish
assert calls[0]["id"] == "call_abc123" and calls[0]["name"] == "get_weather", calls
assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}, calls

# The follow-up with the tool's result completes.
messages.append(choice.message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear"})})
final = client.chat.completions.create(model=model, messages=messages, tools=tools)
assert final.choices[0].finish_reason == "stop", final
assert final.choices[0].message.content == "It is sunny in Paris.", final

# JSON mode and a JSON schema pass through (the SDK's own types).
for response_format in (
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
):
    done = client.chat.completions.create(model=model, messages=messages, response_format=response_format)
    assert done.choices[0].finish_reason == "stop", done

print("ok")
