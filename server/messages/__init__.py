"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): wire schemas and
blocks to chat messages (wire.py), chat chunks to Messages events and objects (events.py), on
the chat-completions service, with Anthropic's error shapes and statuses (routes.py)."""
