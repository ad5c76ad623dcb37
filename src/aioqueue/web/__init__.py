"""The HTTP API and the websocket protocol, on aiohttp."""
