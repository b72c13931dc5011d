"""Keep the demo page offline: no request from the browser may leave the demo's own server.

Gradio's page template loads a script from a public CDN (``iframeResizer`` from cdnjs, only useful when
the app is embedded in another site) and preconnects to the Google font hosts. On a machine without
network the page then waits on them, and on any machine they tell third parties who opened the demo.
:class:`OfflinePage` is an ASGI middleware that removes such tags from the HTML pages the app serves;
the fonts themselves are the browser's own (see ``SYSTEM_FONTS`` in :mod:`.app`).

Example (not run: starts a web server)::

    demo.launch(app_kwargs={"middleware": [starlette.middleware.Middleware(OfflinePage)]})
"""

from __future__ import annotations

import re

EXTERNAL_TAG = re.compile(
    rb"<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*[\"'](?:https?:)?//[^\"']*[\"'][^>]*>(?:\s*</script>)?",
    re.IGNORECASE,
)
"""A ``<script src=...>`` (with its closing tag) or ``<link href=...>`` pointing at another host."""


def strip_external_tags(html: bytes) -> bytes:
    """``html`` without the script and link tags that load from other hosts (``http(s)://`` or ``//``)."""
    return EXTERNAL_TAG.sub(b"", html)


class OfflinePage:
    """ASGI middleware: HTML responses lose the tags that would make the browser contact another host.

    Other responses (JSON, files, streams) and compressed HTML pass through untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {key.lower(): value for key, value in message.get("headers", [])}
                if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers:
                    start = message  # held until the whole page is here
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = strip_external_tags(b"".join(chunks))
                headers = [(key, value) for key, value in start.get("headers", []) if key.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewrite)
