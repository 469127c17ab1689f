"""Models we run ourselves behind the OpenAI completions API (`w2s serve-local`, the demo).

    backend    what a model behind the server must do (`CompletionBackend`)
    server     the aiohttp completions server over any backend, on 127.0.0.1
    causal_lm  a transformers causal LM as a backend (imports torch; loaded only when serving)
    command    `w2s serve-local`
"""
