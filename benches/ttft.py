#!/usr/bin/env python3
"""Time to first token and inter-token gaps of streamed chat completions, as a
client sees them.

    python3 benches/ttft.py URL MODEL [N]

URL is an OpenAI-compatible base such as http://127.0.0.1:8080 (the host) or
http://127.0.0.1:18080 (llama-server directly; see
tests/upstream/llama-server.sh). Sends N (default 10) streaming requests one
after another, each asking for 32 tokens at temperature 0, and prints the
median and worst time to the first non-empty content chunk, the median gap
between content chunks, and the median total time. Run it against the host
and against the server it routes to, with the same prompt, to see what the
pipeline adds.
"""
import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlparse

PROMPT = "Explain in a few sentences why a bounded queue protects a service."


def one(url, model):
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first, stamps, buffer = None, [], b""
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            choices = chunk.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                stamps.append(now)
                first = first or now - start
    total = time.perf_counter() - start
    conn.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return first, gaps, total, len(stamps)


def main():
    url, model = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    one(url, model)  # warm-up
    runs = [one(url, model) for _ in range(n)]
    firsts = [r[0] for r in runs]
    gaps = [g for r in runs for g in r[1]]
    print(f"{url} model={model} n={n}")
    print(f"  first content chunk: median {statistics.median(firsts) * 1e3:.0f} ms, worst {max(firsts) * 1e3:.0f} ms")
    if gaps:
        print(f"  gap between chunks:  median {statistics.median(gaps) * 1e3:.1f} ms ({statistics.median([r[3] for r in runs]):.0f} chunks per answer)")
    print(f"  whole answer:        median {statistics.median([r[2] for r in runs]) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
