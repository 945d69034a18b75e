"""A thin Chrome DevTools Protocol client over aiohttp's WebSocket: just what the browser tests
use (targets in their own browser contexts, navigation, the network's document requests,
script evaluation, screenshots).

Only stable domains of the protocol (Target, Page, Network, Runtime, Input) are used, so
the client works with whichever Chromium Debian ships. Every wait has a deadline and says,
when it expires, what the page did until then.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

#: how long one command or one navigation may take; generous, for a loaded machine
DEFAULT_TIMEOUT = 30.0
#: what a page that never loads usually means here
STALL_HINT = (
    "a page that waits for a client certificate choice never loads in headless mode: is the "
    "AutoSelectCertificateForUrls policy in place (chrome://policy) and does its filter match "
    "the certificate in the NSS database?"
)

Event = dict[str, Any]


class CDPError(Exception):
    """The browser refused a command, or a wait ran out."""


class Connection:
    """One WebSocket to the browser endpoint. Sessions attached with ``flatten`` share it:
    replies are matched by id, events are handed to the page of their session."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._http = http
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> Connection:
        http = aiohttp.ClientSession()
        try:
            # screenshots arrive as one base64 message of a few MiB
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                ws = await http.ws_connect(url, max_msg_size=0)
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        if self._reader.done():
            raise CDPError(f"{method}: the connection to the browser is closed")
        command_id = next(self._ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._ws.send_str(json.dumps(message))
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise CDPError(f"{method}: no answer from the browser within {timeout:g} s") from None
        finally:
            self._pending.pop(command_id, None)

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    future = self._pending.get(data["id"])
                    if future is None or future.done():
                        continue
                    if "error" in data:
                        future.set_exception(CDPError(f"the browser refused: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                elif (page := self._pages.get(data.get("sessionId", ""))) is not None:
                    page.record(data)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the connection to the browser closed"))

    async def new_page(self) -> Page:
        """A tab in a browser context of its own (no cookies, cache or TLS client-certificate
        decisions shared with other pages), with page and network events on."""
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = await self.send(
            "Target.createTarget", {"url": "about:blank", "browserContextId": context}
        )
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], target["targetId"], context)
        self._pages[page.session_id] = page
        await page.send("Page.enable")
        await page.send("Network.enable")
        tree = await page.send("Page.getFrameTree")
        page.main_frame = tree["frameTree"]["frame"]["id"]
        return page

    async def close_page(self, page: Page) -> None:
        self._pages.pop(page.session_id, None)
        with contextlib.suppress(CDPError):
            await self.send("Target.disposeBrowserContext", {"browserContextId": page.context_id})

    async def close(self) -> None:
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._http.close()


@dataclass
class Hop:
    """One document request of a navigation, and the status it got (0: none yet)."""

    method: str
    url: str
    status: int = 0


@dataclass
class Navigation:
    """What the main frame fetched, in order: redirects first, the page it showed last."""

    hops: list[Hop] = field(default_factory=list)

    @property
    def redirects(self) -> int:
        return sum(1 for hop in self.hops if 300 <= hop.status < 400)

    @property
    def final(self) -> Hop:
        assert self.hops, "the navigation made no document request"
        return self.hops[-1]

    def describe(self) -> str:
        return " → ".join(f"{h.method} {h.url} [{h.status or '…'}]" for h in self.hops) or "none"


class Page:
    """One tab. Events are kept in arrival order; a wait looks at those after a mark."""

    def __init__(self, connection: Connection, session_id: str, target: str, context: str) -> None:
        self.connection = connection
        self.session_id = session_id
        self.target_id = target
        self.context_id = context
        self.main_frame = target
        self.events: list[Event] = []
        self._arrived = asyncio.Event()

    def record(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        return await self.connection.send(
            method, params, session_id=self.session_id, timeout=timeout
        )

    async def wait_for(
        self,
        predicate: Callable[[Event], bool],
        *,
        since: int,
        what: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> int:
        """The index of the first event from ``since`` on that satisfies ``predicate``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for index in range(since, len(self.events)):
                        if predicate(self.events[index]):
                            return index
                    since = len(self.events)
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise CDPError(
                f"no {what} within {timeout:g} s; the document requests were: "
                f"{self.navigation(since=0).describe()}. If one is pending, {STALL_HINT}"
            ) from None

    def navigation(self, *, since: int) -> Navigation:
        """The main frame's document requests among the events from ``since`` on."""
        nav = Navigation()
        by_id: dict[str, Hop] = {}
        for event in self.events[since:]:
            params = event.get("params", {})
            if params.get("type") != "Document" or params.get("frameId") != self.main_frame:
                continue
            if event["method"] == "Network.requestWillBeSent":
                redirected = by_id.get(params["requestId"])
                if redirected is not None and "redirectResponse" in params:
                    redirected.status = int(params["redirectResponse"]["status"])
                hop = Hop(params["request"]["method"], params["request"]["url"])
                by_id[params["requestId"]] = hop
                nav.hops.append(hop)
            elif event["method"] == "Network.responseReceived":
                hop_ = by_id.get(params["requestId"])
                if hop_ is not None:
                    hop_.status = int(params["response"]["status"])
        return nav

    async def _wait_loaded(self, since: int, what: str, timeout: float) -> None:
        """Wait for the main frame to commit a new document and fire its load event."""
        committed = await self.wait_for(
            lambda e: (
                e["method"] == "Page.frameNavigated"
                and e["params"]["frame"]["id"] == self.main_frame
            ),
            since=since,
            what=f"new page after {what}",
            timeout=timeout,
        )
        await self.wait_for(
            lambda e: e["method"] == "Page.loadEventFired",
            since=committed,
            what=f"load event after {what}",
            timeout=timeout,
        )

    async def goto(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Navigation:
        """Navigate as if the URL were typed, follow redirects, wait for the page's load."""
        mark = len(self.events)
        try:
            result = await self.send("Page.navigate", {"url": url}, timeout=timeout)
        except CDPError as exc:
            raise CDPError(
                f"{exc}; the document requests were: {self.navigation(since=mark).describe()}. "
                f"If one is pending, {STALL_HINT}"
            ) from None
        if result.get("errorText"):
            raise CDPError(
                f"{url}: {result['errorText']}; the document requests were: "
                f"{self.navigation(since=mark).describe()}"
            )
        await self._wait_loaded(mark, f"opening {url}", timeout)
        return self.navigation(since=mark)

    async def click(self, selector: str, *, timeout: float = DEFAULT_TIMEOUT) -> Navigation:
        """Click the element (as a person would: it must be visible) and wait for the page it
        leads to."""
        mark = len(self.events)
        box = await self.evaluate(
            f"""(() => {{
                const r = document.querySelector({json.dumps(selector)})?.getBoundingClientRect();
                return r && r.width > 0 && r.height > 0 ? [r.x + r.width / 2, r.y + r.height / 2]
                                                        : null; }})()"""
        )
        if box is None:
            raise CDPError(f"nothing visible to click at {selector!r} on {await self.url()}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )
        await self._wait_loaded(mark, f"clicking {selector!r}", timeout)
        return self.navigation(since=mark)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values only)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def url(self) -> str:
        return str(await self.evaluate("location.href"))

    async def title(self) -> str:
        return str(await self.evaluate("document.title"))

    async def text(self, selector: str = "body") -> str:
        """The rendered text of the first element that matches (what a person reads)."""
        value = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.innerText ?? null"
        )
        if value is None:
            raise CDPError(f"no element {selector!r} on {await self.url()}")
        return str(value)

    async def set_extra_headers(self, headers: dict[str, str]) -> None:
        """Send these headers with every request from now on (as an extension or a proxy
        could make a browser do)."""
        await self.send("Network.setExtraHTTPHeaders", {"headers": headers})

    async def screenshot(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> Path:
        """Save the whole page (not only the window) as a PNG."""
        metrics = await self.send("Page.getLayoutMetrics", timeout=timeout)
        size = metrics["cssContentSize"]
        shot = await self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": max(1, size["width"]),
                    "height": max(1, size["height"]),
                    "scale": 1,
                },
            },
            timeout=timeout,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
