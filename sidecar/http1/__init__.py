"""HTTP/1.1 on the wire, both sides of the sidecar: ``upstream`` (a connection to the upstream
application: the request head, the body, the response parser) and ``pool`` (its keep-alive
connections)."""
