"""A minimal asynchronous Kubernetes REST client for the node agent (kubelet stand-in).

Authenticates with the client certificate from its kubeconfig, as a kubelet does.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Kube:
    def __init__(self, kubeconfig: Path):
        config = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = config["current-context"]
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        self.server = cluster["server"].rstrip("/")
        self.ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.ssl.load_cert_chain(user["client-certificate"], user["client-key"])
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl), read_bufsize=2**22)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
                      content_type: str = "application/json", ok_missing: bool = False) -> Any:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(method, self.server + path, data=data, params=params, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
            text = await resp.text()
            payload = json.loads(text) if text and text.lstrip().startswith("{") else text
            if resp.status == 404 and ok_missing:
                return None
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    async def get(self, path: str, **kw) -> Any:
        return await self.request("GET", path, **kw)

    async def watch(self, path: str, params: dict) -> AsyncIterator[dict]:
        params = dict(params, watch="1", allowWatchBookmarks="true")
        async with self.session.get(self.server + path, params=params,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)
