"""The dashboard: one page (index.html, app.js, style.css beside this file), served as it is.

No build step and nothing from a CDN: the files here are what the browser runs, so the page
works with no network beyond this service. They hold no secret and are served to anyone; every
API call the page makes is checked as any other (with auth on, the page asks for a token).

Served with a strict Content-Security-Policy: scripts, styles and connections from this origin
only, no inline script or style, no frames, no forms posted elsewhere. The job records the page
shows are written into the DOM as text, never as HTML; the policy is the second line of defence
should that ever slip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from aiohttp import web

from aioqueue.errors import NotFound
from aioqueue.web.problems import problems

#: The page's files, and their media types.
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
#: Where index.html names the dashboard's path (`[dashboard] path`), for its links to the others.
BASE = "__DASHBOARD_PATH__"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # 'self' covers the websocket of the same host and port (CSP Level 3).
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (a 304 while unchanged): an upgrade shows at once, never a page
    # of one version with the script of another.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media: str
    etag: str


def load(path: str) -> dict[str, Asset]:
    """The page's files as served at `path`, read once (they are package data)."""
    here = files(__name__)
    assets = {}
    for name, media in ASSETS.items():
        body = here.joinpath(name).read_bytes()
        if name == "index.html":
            body = body.replace(BASE.encode(), path.encode())
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[name] = Asset(body, media, etag)
    return assets


def add_dashboard(router: web.UrlDispatcher, path: str) -> None:
    """`GET path` (the page) and `GET path/{asset}` (its script and style sheet)."""
    assets = load(path)

    @problems
    async def page(request: web.Request) -> web.StreamResponse:
        return _serve(request, assets["index.html"])

    @problems
    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if name == "index.html" or name not in assets:
            raise NotFound(f"no file {name[:100]!r} in the dashboard")
        return _serve(request, assets[name])

    router.add_get(path, page)
    router.add_get(path + "/{asset}", asset)


def _serve(request: web.Request, asset: Asset) -> web.Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.media, charset="utf-8", headers=headers)
