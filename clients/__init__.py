"""Clients of npugate: they talk to the server over HTTP and WebSockets only.

terminal.py is `npugate chat`; ws_example.py is a minimal WebSocket client; web/ is the
browser chat page the server serves at `/`.
"""
