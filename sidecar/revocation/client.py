"""Revocation data over HTTP, with aiohttp: ``HttpTransport``, the one module of this package
that talks to the network (the application hands it to ``gate.Revocation``, so that what the
request path imports stays free of aiohttp).

One GET or POST, bounded in time (the whole exchange, connection included) and in size (a
body announced or found larger than ``limit`` is not read further: the connection is
dropped), every aiohttp failure turned into ``FetchError``. Redirects are not followed (RFC
5280 and RFC 6960 practice: the URL a CA put in its certificates, or the configured one, is
the address). Bodies are read as sent (``Accept-Encoding: identity``, no decompression), so
that their size is what is held.
"""

from __future__ import annotations

import aiohttp

from .fetch import FetchError


class HttpTransport:
    """``fetch.Transport`` over one aiohttp session, made on first use (inside the loop)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=False,
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        limit: int,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str,
    ) -> bytes:
        """The body of an HTTP 200 answer, at most ``limit`` bytes; raises ``FetchError``."""
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        session = self._get_session()
        try:
            async with session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    _abandon(response)
                    what = " (a redirect, not followed)" if 300 <= response.status < 400 else ""
                    raise FetchError("http-status", f"HTTP {response.status}{what}")
                length = response.content_length
                if length is not None and length > limit:
                    _abandon(response)
                    raise FetchError("too-large", f"announced {length} bytes, more than {limit}")
                data = bytearray()
                while chunk := await response.content.readany():
                    data += chunk
                    if len(data) > limit:
                        _abandon(response)
                        raise FetchError("too-large", f"more than {limit} bytes")
                return bytes(data)
        except TimeoutError:
            raise FetchError("timeout", f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise FetchError("connect", f"cannot connect: {exc.strerror or exc}") from None
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
            aiohttp.ClientPayloadError,
        ):
            raise FetchError("reset", "the connection was reset") from None
        except aiohttp.ClientError as exc:
            raise FetchError("protocol", f"the exchange failed ({type(exc).__name__})") from None
        except ValueError as exc:  # a URL aiohttp cannot use
            raise FetchError("protocol", f"unusable URL: {exc}") from None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _abandon(response: aiohttp.ClientResponse) -> None:
    """Drop the connection at once rather than read a body of no use."""
    connection = response.connection
    if connection is not None and connection.transport is not None:
        connection.transport.abort()
    response.release()
