"""HTTP/1.1 on the wire, on both sides of the sidecar.

The client side: ``heads`` reads request heads from bytes (pure: every framing limit and
refusal), ``client`` is the protocol of a client connection (deadlines, pipelining, flow
control, hand-off, the answers' framing). The upstream side: ``upstream`` is a connection to
the application (the request head, the body, the response parser), ``pool`` its keep-alive
connections.
"""
