"""The OpenAI wire format, written once for every part of the project that speaks it.

    requests   what a client may send the guidance server (strict: a field we cannot honour is a 400)
    responses  the bodies our servers write (completions, chat, chunks, models, errors)
    engine     a plain completions engine's side: the requests our local model server accepts
               (OpenAI's rules, fields that do not change the output ignored) and the lenient
               reading of an upstream's completions (extra fields ignored)
    chat_reading  the lenient reading of an upstream's chat completions: the answer text only,
               never a reasoning part
"""
