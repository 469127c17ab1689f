"""Test and benchmark doubles: only tests/ and benchmarks/ import this package.

    toy_model   a seeded Markov-chain "model" over one-token words (exact token counts, no weights)
    toy_server  the local completions server over the toy, with fault injection and bookkeeping
    faults      the faults it injects and the answers they make
    fake_openai_chat  a chat completions server in the vLLM, DeepSeek, Mistral and OpenRouter
                dialects, written from their documentation, rejections included
    fake_anthropic    the Messages API as Anthropic documents it, rejections included
"""
