"""agent-identity (llm-d's): a request's fairness id from an agent's session header, so every turn
of one agent session joins the same flow-control queue.

The id (`fairness_id`): the explicit fairness header (pickers.framework.flowcontrol.FAIRNESS_ID_HEADERS)
when set and not empty, else the first non-empty session header of `additionalSessionHeaders` (in
order, lower-cased) then llm-d's built-in list, else `default-flow`. llm-d stores the session value as
the request attribute `agent-identity`; here the one consumer, flow control, asks for the id.
"""

from __future__ import annotations

from pickers.framework.flowcontrol import DEFAULT_FLOW_ID, explicit_fairness_id
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.plugins.base import Plugin, PluginContext

# Claude Code, OpenCode, Codex (>= 0.131), Codex (older, underscored)
SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity", "session-id", "session_id")


class AgentIdentity(Plugin):
    type = "agent-identity"

    def __init__(self, name: str = "agent-identity", additional: tuple[str, ...] = ()) -> None:
        self.name = name
        self.headers = tuple(h.lower() for h in additional) + SESSION_HEADERS

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> AgentIdentity:
        return cls(name, tuple(p.strings("additionalSessionHeaders")))

    def agent_identity(self, request: InferenceRequest) -> str:
        """The session value of the first session header set, else ""."""
        headers = request.headers
        for h in self.headers:
            value = headers.get(h)
            if value:
                return value
        return ""

    def fairness_id(self, request: InferenceRequest) -> str:
        return explicit_fairness_id(request) or self.agent_identity(request) or DEFAULT_FLOW_ID
