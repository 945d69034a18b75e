"""Everything aiohttp on the server side: the connections the HTTP/1.1 protocol hands over
(an upgrade: a WebSocket, or ``CONNECT``; every other request is served there) are served by
aiohttp's server to their end. ``server`` holds that server, bounds WebSockets and puts each
request through the gateway; ``connection`` is aiohttp's protocol with our limits and error
pages; ``forward`` sends the requests upstream (WebSockets through aiohttp's client),
``websocket`` relays their frames."""
