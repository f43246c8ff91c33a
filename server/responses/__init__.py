"""OpenAI's Responses API (`/v1/responses`), stored: wire schemas and input items (wire.py),
the event stream (events.py), the store (store.py), the service on the chat-completions
generation loop (service.py) and the routes."""
