-- wrk script for benches/load.sh: POST one chat completion per request.
-- STREAM=1 asks for server-sent events.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local stream = os.getenv("STREAM") == "1"
wrk.body = '{"model":"echo","stream":' .. (stream and "true" or "false") ..
  ',"messages":[{"role":"user","content":"What is backpressure and how does the orchestrator shed load?"}]}'
