"""inflight-load-producer (llm-d): what each request adds to the in-flight counts of the endpoints it
goes to, which active-request-scorer (requests) and token-load-scorer (tokens) read, and when it
comes off. Without this producer the EPP counts one request and prompt + max_tokens tokens on the
primary, from the pick to the response's end.

With it, as llm-d documents (README of inflightload):
- every chosen endpoint counts the request: the decode (primary) one and, with P/D, the prefill one;
- tokens are the prompt's uncached part there, from the prefix match of the producer named in
  `prefixMatchInfoProducerName` (default: the config's approximate match, when there is one):
  `(blocks in the prompt - blocks held) x block tokens + the prompt's tokens past the matched span`;
- `addEstimatedOutputTokens` (false) adds `min(round(prompt x outputRatio), max_tokens, maxEstimatedOutputTokens)`
  (ratio 1.5; the client's max_tokens and the cap only when given) on the decode endpoint;
- the prompt part comes off at the response's first byte, the output part and the request at its end;
  a prefill endpoint's whole share comes off at the first byte (its work is done).

`syncCrossReplicaState` (true) shares the counts with other EPP replicas in llm-d when peers are
configured; llm-epp has no peer sync, so both values mean what false means there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, InFlightCharge, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource
from pickers.plugins.scorer.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer

DEFAULT_OUTPUT_RATIO = 1.5


class InFlightLoadProducer(Plugin):
    type = "inflight-load-producer"

    def __init__(
        self,
        name: str = "inflight-load-producer",
        *,
        add_output: bool = False,
        output_ratio: float = DEFAULT_OUTPUT_RATIO,
        max_output: int | None = None,
    ) -> None:
        self.name = name
        self.add_output = add_output
        self.output_ratio = output_ratio
        self.max_output = max_output
        self.producer_name: str | None = None  # prefixMatchInfoProducerName as given
        self.source: PrefixMatchSource | None = None  # the prefix match that discounts the prompt

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> InFlightLoadProducer:
        add = p.flag("addEstimatedOutputTokens", False)
        ratio = p.number("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0.0)
        cap = p.integer("maxEstimatedOutputTokens", 0, minimum=0) if p.given("maxEstimatedOutputTokens") else None
        if cap is None:
            p.effective["maxEstimatedOutputTokens"] = None
        p.flag("syncCrossReplicaState", True)  # no peers here: nothing to sync either way (see the module doc)
        producer = cls(name, add_output=add, output_ratio=ratio, max_output=cap)
        producer.producer_name = p.string("prefixMatchInfoProducerName")
        return producer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """The prefix match that discounts the prompt: the producer named, else the config's approximate one."""
        if self.producer_name is not None:
            found = plugins.get(self.producer_name)
            if not isinstance(found, PrefixMatchSource) or isinstance(found, PrefixCacheScorer):
                what = "no plugin" if found is None else f"{getattr(found, 'type', '?')}, not a prefix producer"
                raise ParameterError("prefixMatchInfoProducerName", f"{shown(self.producer_name)}: {what}")
            self.source = found
            return
        approx = [q for q in plugins.values() if isinstance(q, ApproxPrefixCacheProducer)]
        named = [q for q in approx if q.name == ApproxPrefixCacheProducer.type]
        if named or len(approx) == 1:
            self.source = (named or approx)[0]
        else:  # GIE's shape: the prefix-cache-scorer keeps the approximate settings itself
            self.source = next((q for q in plugins.values() if isinstance(q, PrefixCacheScorer) and q.precise is None), None)

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.source is None or self.producer_name is not None:
            return given
        return {**given, "prefixMatchInfoProducerName": f"unset ({self.source.name})"}

    def estimate_output(self, prompt_tokens: int, client_max: int | None) -> int:
        if prompt_tokens <= 0:
            return 0
        est = round(prompt_tokens * self.output_ratio)
        if client_max is not None and client_max < est:
            est = client_max
        if self.max_output is not None and self.max_output < est:
            est = self.max_output
        return est

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if not result.endpoints:
            return
        primary = result.endpoints[0]
        chosen = [primary]
        if result.profile_results is not None:
            chosen += [eps[0] for eps in result.profile_results.values() if eps and all(eps[0] is not c for c in chosen)]
        prompt = request.prompt_tokens
        matches = self.source.prefix_matches(request, cycle, chosen) if self.source is not None else {}
        charges: list[InFlightCharge] = []
        for ep in chosen:
            found = matches.get(ep.address)
            if found is None or found[2] <= 0:
                uncached = prompt
            else:
                held, total, block_tokens = found
                indexed = total * block_tokens
                uncached = max(0, indexed - held * block_tokens) + max(0, prompt - indexed)
            if ep is primary:
                output = self.estimate_output(prompt, request.max_tokens) if self.add_output else 0
                charges.append(InFlightCharge(ep, tokens=output, early_tokens=uncached))
            else:  # a prefill endpoint: done at the first byte
                charges.append(InFlightCharge(ep, early_tokens=uncached, early_request=True))
        result.in_flight = charges
