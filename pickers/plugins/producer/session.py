"""session-id-producer (llm-d): the request's session identifier, read from one header (`headerName`,
compared lower-cased) or one cookie of the `Cookie` header (`cookieName`), exactly one of them, and
put on the request as the attribute `SessionIDDataKey` of this producer (`InferenceRequest.attributes`).

Its reader is session-affinity-scorer with `strategy: session_id` and a source
`{attribute: SessionIDDataKey, producer: <this plugin's name>}`. An absent or empty value puts
nothing: the request has no session preference.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

SESSION_ID_ATTRIBUTE = "SessionIDDataKey"  # llm-d's attribute key
COOKIE_HEADER = "cookie"


class SessionIDProducer(Plugin):
    type = "session-id-producer"

    def __init__(self, name: str = "session-id-producer", *, header: str = "", cookie: str = "") -> None:
        self.name = name
        self.header = header.strip().lower()
        self.cookie = cookie.strip()
        self.key = (SESSION_ID_ATTRIBUTE, name)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SessionIDProducer:
        header = (p.string("headerName") or "").strip()
        cookie = (p.string("cookieName") or "").strip()
        if bool(header) == bool(cookie):
            raise ParameterError(
                "headerName" if header else "", "exactly one of headerName and cookieName must be set" + (", not both" if header else "")
            )
        return cls(name, header=header, cookie=cookie)

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if self.header:
            value = request.headers.get(self.header, "").strip()
        else:
            value = cookie_value(request.headers.get(COOKIE_HEADER, ""), self.cookie).strip()
        if value:
            request.attributes[self.key] = value


def cookie_value(header: str, name: str) -> str:
    """The value of cookie `name` in a `Cookie` header (`a=1; b=2`), else ""."""
    if not header or not name:
        return ""
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value
    return ""
