"""`herd serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    app.py       the endpoints (chat, completions, tokenize, metrics, the chat page)
    protocol.py  request bodies, the error shape, OpenAI messages -> herd's chat format
    worker.py    the thread that owns the engine; requests in, outputs out through queues
    text.py      incremental detokenisation with stop strings
    metrics.py   Prometheus text
    command.py   the `herd serve` subcommand
FastAPI and uvicorn are the optional `serve` extra: `pip install "herd[serve]"`.
"""
