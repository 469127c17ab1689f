"""The OpenAI-compatible guidance server, split the way vLLM's OpenAI entrypoint splits it.

    (the wire models, requests, responses and errors, live in proxy.protocol)
    guidance     model alias + OpenAI fields + `w2s` field + caps -> the request's search
    errors       ApiError, validation and upstream failures -> OpenAI-shaped 4xx/5xx
    auth         proxy keys, compared in constant time
    endpoint     what a generation route adds to the core: prompt, response and chunk shapes
    completions  POST /v1/completions          chat  POST /v1/chat/completions
    generation   the shared core: parse, plan, admit, search with metrics, answer
    streaming    server-sent events of the settled common prefix of the surviving beams
    metrics      /metrics on prometheus_client
    app          GuidanceServer: lifecycle, routes, middleware, readiness
    command      `w2s serve`

Nothing is imported here, so importing one part (e.g. the wire models) does not start the rest.
"""
