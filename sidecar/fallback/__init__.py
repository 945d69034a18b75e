"""Everything aiohttp on the server side: the connections the HTTP/1.1 protocol hands over
(a request with a body, an upgrade, a head it does not read itself) are served by aiohttp's
server to their end. ``server`` holds that server and puts each request through the gateway;
``connection`` is aiohttp's protocol with our limits and error pages; ``forward`` sends the
requests with their bodies upstream (and WebSockets, through aiohttp's client), ``websocket``
relays their frames."""
