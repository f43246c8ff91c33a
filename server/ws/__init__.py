"""The WebSocket protocol of `/v1/ws`: conversations multiplexed on one socket."""
