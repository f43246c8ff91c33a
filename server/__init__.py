"""npugate's HTTP layer, one package per API surface over a shared core.

    server/
      app.py        the composition root: builds the core, installs every surface
      cli.py        `npugate`: flags to Settings (loads no runtime)
      settings.py   every server default, once (the engines' come from inference/limits.py)
      serve.py      Hypercorn, graceful shutdown
      core/         what every surface shares: the generation loop (streaming.py), the
                    model registry and catalogue, security and the HTTP edge (access.py),
                    limits, metrics, SSE framing, and the one error map (errors.py)
      openai/       OpenAI chat, completions, embeddings and models: wire schemas (wire.py),
                    services that drive the engines, chunk shapes, tools, routes
      responses/    OpenAI's Responses API: items to chat messages, chat chunks to Responses
                    events, on the chat service; the response store (SQLite, PostgreSQL)
      messages/     Anthropic's Messages API: blocks to chat messages, chat chunks to
                    Anthropic's events, Anthropic's error shapes, on the chat service
      ws/           the WebSocket protocol (/v1/ws), on the OpenAI services
      ops/          health probes and /metrics, admin, the browser page

A new protocol is a new package beside `openai/`: its wire schemas, its translation to and
from the engines (or the OpenAI services), its routes, installed in `app.py`. The core never
imports a surface (tests/test_house.py). Nothing here builds or runs an onnxruntime session;
that is `inference/`'s job.
"""
