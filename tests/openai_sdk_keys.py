"""API keys and rate limits through the official OpenAI Python SDK, unchanged.

Usage: python3 tests/openai_sdk_keys.py http://127.0.0.1:PORT LIMITED_KEY FAST_KEY
Run by tests/policies.rs. LIMITED_KEY may make 2 requests per hour;
FAST_KEY 1 per second (a limit of the key itself). Exits non-zero (with a
traceback) on any mismatch; prints "ok" at the end.
"""

import sys

import openai
from openai import OpenAI

base, limited, fast = sys.argv[1] + "/v1", sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "hello"}]

# With the key: answers.
client = OpenAI(base_url=base, api_key=limited, max_retries=0)
for _ in range(2):
    completion = client.chat.completions.create(model="echo", messages=messages)
    assert completion.choices[0].message.content == "hello", completion

# Past the limit: RateLimitError, with OpenAI's headers.
try:
    client.chat.completions.create(model="echo", messages=messages)
    raise AssertionError("a third request within the hour was answered")
except openai.RateLimitError as error:
    assert error.status_code == 429, error
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0", error.response.headers
    assert int(error.response.headers["retry-after"]) >= 1, error.response.headers
    assert error.code == "rate_limit_exceeded", error.body

# Without our key (the SDK insists on some key: a placeholder, as code
# written for a keyless local server passes): AuthenticationError.
try:
    OpenAI(base_url=base, api_key="not-needed", max_retries=0).chat.completions.create(
        model="echo", messages=messages
    )
    raise AssertionError("a request without a key was answered")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error
    assert error.code == "invalid_api_key", error.body

# A wrong key: AuthenticationError too.
try:
    OpenAI(base_url=base, api_key="sk-orch-000000000000-" + "0" * 48, max_retries=0).chat.completions.create(
        model="echo", messages=messages
    )
    raise AssertionError("a wrong key was answered")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error

# One request per second: the SDK's own retry waits out Retry-After and
# gets through in the next window.
# (Two requests: the `hourly` rule allows this principal two as well.)
retrying = OpenAI(base_url=base, api_key=fast, max_retries=3)
for _ in range(2):
    completion = retrying.chat.completions.create(model="echo", messages=messages)
    assert completion.choices[0].message.content == "hello", completion

print("ok")
