"""The OpenAI wire format our servers speak, written once for every part of the project that speaks it.

    requests        what a client may send the guidance server (strict: a field we cannot honour is a 400)
    responses       the bodies our servers write (completions, chat, chunks, models, errors)
    model_requests  what our model servers (`w2s serve-local`, the test servers) accept on
                    /v1/completions (OpenAI's rules, fields that do not change the output ignored)

How we read what an upstream answers is the upstreams' business: proxy.upstreams.reading.
"""
