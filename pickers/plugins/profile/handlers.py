"""Profile handlers decide which scheduling profiles run for a request and how their results combine.

- `single-profile-handler`: run the one profile, use its pick. The scheduler runs it inline (no
  handler calls on the hot path).
- `disagg-profile-handler` (llm-d P/D, E/PD, E/P/D): run `decode`; then, if its encode decider says
  so, `encode`; then, if its prefill decider says so, `prefill` (llm-d's decode-first order: both
  deciders see the decode pick, and the prefill profile sees it as the cycle's peer, which the
  topology affinity plugins compare candidates against); a decider that judges the prefill pick too
  (latency-pd-decider) may then drop it, serving the request aggregated. The decode pick is the
  destination, the prefill pick goes in `x-prefiller-host-port`, the encode picks (as many as the
  encode profile's picker returns) in `x-encoder-hosts-ports`, comma-separated. No prefill or encode
  endpoint (or a failed profile) means that stage runs on the decode endpoint, not that the request
  fails.
- `pd-profile-handler`: llm-d's older name and parameters for the same thing; its `primaryPort`
  sends the decode pick through that port of its pod with the rank in `x-data-parallel-host-port`
  (profile/data_parallel.py), the prefill pick staying a rank endpoint.
- `data-parallel-profile-handler` (profile/data_parallel.py): one profile, through the primary port.
- `header-profile-handler` (profile/header.py): the one profile a request header names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pickers.framework.errors import RequestError, shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import SINGLE_PROFILE_HANDLER, CycleState, ProfileOutcome, SchedulingProfile, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.filter.role import decodes
from pickers.plugins.profile.data_parallel import primary_port, route_through_primary_port
from pickers.plugins.profile.latency_pd_decider import LatencyPdDecider
from pickers.plugins.profile.pd_deciders import (
    AlwaysDisaggMultimodalDecider,
    AlwaysDisaggPDDecider,
    PdDecider,
    PrefillPickDecider,
    PrefixBasedPDDecider,
)
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer

PREFILLER_HEADER = "x-prefiller-host-port"
ENCODERS_HEADER = "x-encoder-hosts-ports"

class SingleProfileHandler(Plugin):
    type = SINGLE_PROFILE_HANDLER

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        if len(profiles) != 1:
            raise ParameterError("", f"runs exactly one scheduling profile, got {len(profiles)}: {', '.join(profiles)}")

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        return [] if results else list(profiles.values())

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        name, outcome = next(iter(results.items()))
        if isinstance(outcome, RequestError):
            raise outcome
        return SchedulingResult(outcome, name)


class DisaggProfileHandler(Plugin):
    """Decode always; encode, then prefill, when their deciders approve and an endpoint can take it."""

    type = "disagg-profile-handler"

    def __init__(
        self,
        name: str = "disagg-profile-handler",
        *,
        decode_profile: str = "decode",
        prefill_profile: str = "prefill",
        decider: PdDecider | str | None = None,
        decider_param: str = "deciders.prefill",
        encode_profile: str = "encode",
        encode_decider: PdDecider | str | None = None,
    ) -> None:
        self.name = name
        self.decode_profile = decode_profile
        self.prefill_profile = prefill_profile
        self.encode_profile = encode_profile
        self.decider: PdDecider | None = decider if not isinstance(decider, str) else None
        self._decider_name = decider if isinstance(decider, str) else None
        self._decider_param = decider_param
        self.encode_decider: PdDecider | None = encode_decider if not isinstance(encode_decider, str) else None
        self._encode_decider_name = encode_decider if isinstance(encode_decider, str) else None
        self._decode: SchedulingProfile | None = None
        self._prefill: SchedulingProfile | None = None
        self._encode: SchedulingProfile | None = None
        self.bind_warnings: list[str] = []  # for the loader

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DisaggProfileHandler:
        # llm-d's disagg handler drops it without a word, so a config moved over from pd-profile-handler
        # would lose its rank rewrite unseen; 0 (off) is what it does there
        p.refused("primaryPort", "disagg-profile-handler ignores it in llm-d (only pd-profile-handler and "
                  "data-parallel-profile-handler send a rank through a primary port); remove it, or keep "
                  "pd-profile-handler", allowed=lambda v: v == 0 and not isinstance(v, bool))  # fmt: skip
        _decode_first(p)
        profiles = _names(p, "profiles", ("decode", "prefill", "encode"))
        deciders = _names(p, "deciders", ("prefill", "encode"))
        decider_param = "deciders.prefill"
        legacy = p.string("deciderPluginName")
        if legacy is not None:  # llm-d 0.9/0.10 still take it, with this warning; 0.11 removed it
            if "prefill" in deciders:
                raise ParameterError("deciderPluginName", "set either deciderPluginName (deprecated) or deciders.prefill, not both")
            p.warnings.append("Deprecated parameter 'deciderPluginName', use 'deciders.prefill' instead")
            deciders["prefill"], decider_param = legacy, "deciderPluginName"
        return cls(
            name,
            decode_profile=profiles.get("decode", "decode"),
            prefill_profile=profiles.get("prefill", "prefill"),
            decider=deciders.get("prefill"),
            decider_param=decider_param,
            encode_profile=profiles.get("encode", "encode"),
            encode_decider=deciders.get("encode"),
        )

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        if self._decider_name is not None:
            self.decider = _decider(
                plugins, self._decider_name, self._decider_param,
                f"{PrefixBasedPDDecider.type}, {AlwaysDisaggPDDecider.type} or {LatencyPdDecider.type}",
            )  # fmt: skip
        if self._encode_decider_name is not None:
            self.encode_decider = _decider(plugins, self._encode_decider_name, "deciders.encode", AlwaysDisaggMultimodalDecider.type)
        if self.encode_decider is not None:
            self._encode = profiles.get(self.encode_profile)
            if self._encode is None:
                raise ParameterError(
                    "profiles.encode", f"no scheduling profile named {shown(self.encode_profile)}; defined: {', '.join(profiles)}"
                )
        self._decode = profiles.get(self.decode_profile)
        if self._decode is None:
            raise ParameterError("profiles.decode", f"no scheduling profile named {shown(self.decode_profile)}; defined: {', '.join(profiles)}")
        self._prefill = profiles.get(self.prefill_profile)
        if self._prefill is None and self.decider is not None:
            raise ParameterError(
                "profiles.prefill", f"no scheduling profile named {shown(self.prefill_profile)}; defined: {', '.join(profiles)}"
            )
        self.bind_warnings = []
        if isinstance(self.decider, LatencyPdDecider) and self._prefill is not None:
            if all(ws.scorer is not self.decider for ws in self._prefill.scorers):
                self.bind_warnings.append(
                    f"{self._decider_param} {shown(self.decider.name)} is not a scorer of the {shown(self.prefill_profile)} "
                    "profile: it judges that profile's pick against a local prefill but does not choose the fastest "
                    "prefill endpoint; list it there to have it choose"
                )
        if isinstance(self.decider, PrefixBasedPDDecider):
            # the decider must hash prompts as the prefix scorer that fills the index does
            for ws in self._decode.scorers:
                if isinstance(ws.scorer, PrefixCacheScorer):
                    self.decider.block_chars = ws.scorer.block_chars
                    self.decider.max_blocks = ws.scorer.max_blocks
                    break

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        decode = results.get(self.decode_profile)
        if decode is None:
            assert self._decode is not None
            return [self._decode]
        if isinstance(decode, RequestError) or self.prefill_profile in results:
            return []  # decode failed, or prefill (the last stage) ran
        # encode, asked once: it either ran or the decider said no in the call that went on to prefill
        if self._encode is not None and self.encode_profile not in results:
            assert self.encode_decider is not None
            if self.encode_decider.disaggregate(request, cycle, decode[0]):
                return [self._encode]
        if not decodes(decode[0]):
            return []  # a prefill endpoint let in by decode-filter's prefillEndpointsBelowTokens serves it whole
        if self._prefill is not None and self.decider is not None and self.decider.disaggregate(request, cycle, decode[0]):
            cycle.peer = decode[0]  # what the prefill profile's topology plugins compare against
            return [self._prefill]
        return []

    def peer_profiles(self) -> tuple[str, ...]:
        """The prefill profile runs with the decode pick as its peer (llm-d's decode-first order)."""
        return (self.prefill_profile,)

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        decode = results[self.decode_profile]
        if isinstance(decode, RequestError):
            raise decode
        result = SchedulingResult(decode, self.decode_profile)
        prefill = results.get(self.prefill_profile)
        if isinstance(prefill, list) and prefill and isinstance(self.decider, PrefillPickDecider):
            if not self.decider.keep_prefill(request, cycle, decode[0], prefill[0]):
                prefill = None  # the decider found a local prefill cheaper than the pick
        if isinstance(prefill, list) and prefill:
            # No prefill endpoint (a RequestError here) just means the decode endpoint prefills itself.
            result.request_headers[PREFILLER_HEADER] = prefill[0].address
            result.profile_results = {self.decode_profile: decode, self.prefill_profile: prefill}
        encoders = results.get(self.encode_profile) if self._encode is not None else None
        if isinstance(encoders, list) and encoders:
            # Likewise no encoder: the decode (or prefill) endpoint encodes the media itself. Encoders
            # hold none of the prompt's KV, so they stay out of profile_results (which the prefix index
            # and the in-flight counts read).
            result.request_headers[ENCODERS_HEADER] = ",".join(ep.address for ep in encoders)
            result.encoders = encoders
        return result


class PdProfileHandler(DisaggProfileHandler):
    """llm-d's older `pd-profile-handler`: `decodeProfile`, `prefillProfile`, `deciderPluginName`.

    Its oldest form had no decider plugin but `threshold` (non-cached tokens; 0 = always P/D) and
    `hashBlockSize`; with no plugin by the decider's name, `threshold` builds that decider.
    `hashBlockSize` was the prefix plugin's block size copied here: accepted when it cannot matter
    (threshold 0: always P/D) or equals the decode profile's prefix-cache-scorer's block size (in
    characters), refused otherwise. `prefixPluginName`/`prefixPluginType` were never used by llm-d
    (deprecated: accepted with a warning); `prefixMatchInfoProducerName` must name an
    approx-prefix-cache-producer.
    """

    type = "pd-profile-handler"

    def __init__(self, name: str, *, threshold: int | None, ctx: PluginContext, **kw: Any) -> None:
        super().__init__(name, decider_param="deciderPluginName", **kw)
        self._threshold = threshold
        self._ctx = ctx
        self._hash_block_size: int | None = None
        self._producer_name: str | None = None
        self.primary_port = 0  # 0: the decode pick is the destination as it is

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PdProfileHandler:  # type: ignore[override]
        port = primary_port(p, 0)
        if port:  # llm-d's message, logged once at load
            p.warnings.append("Deprecated: primaryPort not needed with Istio >= 1.28.1 (each rank port is its own endpoint)")
        unused = "llm-d never read it either"
        p.deprecated("prefixPluginType", unused)
        p.deprecated("prefixPluginName", unused)
        threshold = p.integer("threshold", -1, minimum=0)  # -1: not given
        handler = cls(
            name,
            threshold=None if threshold < 0 else threshold,
            ctx=ctx,
            decode_profile=p.string("decodeProfile", "decode") or "decode",
            prefill_profile=p.string("prefillProfile", "prefill") or "prefill",
            decider=p.string("deciderPluginName", PrefixBasedPDDecider.type),
        )
        handler._hash_block_size = p.integer("hashBlockSize", 0, minimum=1) or None
        handler._producer_name = p.string("prefixMatchInfoProducerName")
        handler.primary_port = port
        return handler

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        result = super().process_results(request, cycle, results)
        if self.primary_port:
            # llm-d: only the decode pick goes through the primary port; x-prefiller-host-port keeps
            # the prefill rank's own address
            route_through_primary_port(result, self.primary_port)
        return result

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        if self._producer_name is not None:
            found = plugins.get(self._producer_name)
            if not isinstance(found, ApproxPrefixCacheProducer):
                what = "no plugin" if found is None else f"{getattr(found, 'type', '?')}, not an {ApproxPrefixCacheProducer.type}"
                raise ParameterError("prefixMatchInfoProducerName", f"{shown(self._producer_name)}: {what}")
        built_in = self._threshold is not None and self._decider_name is not None and self._decider_name not in plugins
        if built_in:
            self._decider_name = None
            self.decider = (
                AlwaysDisaggPDDecider(f"{self.name}/threshold")
                if self._threshold == 0
                else PrefixBasedPDDecider(self._ctx, f"{self.name}/threshold", non_cached_tokens=self._threshold)
            )
        super().bind(plugins, profiles)
        if self._hash_block_size is not None:
            self._check_hash_block_size(built_in)

    def _check_hash_block_size(self, built_in: bool) -> None:
        if built_in and self._threshold == 0:
            return  # always P/D: no block is ever counted, whatever its size (as in llm-d)
        if not built_in:
            raise ParameterError(
                "hashBlockSize", "only the threshold form uses it; the decider plugin takes the prefix scorer's block size"
            )
        assert isinstance(self.decider, PrefixBasedPDDecider)
        if self._hash_block_size != self.decider.block_chars:
            raise ParameterError(
                "hashBlockSize",
                f"{self._hash_block_size} differs from the block size the decode profile's prefix match uses "
                f"({self.decider.block_chars} characters); llm-epp hashes a prompt once, so they must agree",
            )


class DisaggHeadersHandler(Plugin):
    """llm-d's deprecated header plugins (`disagg-headers-handler`, `prefill-header-handler`): the
    disagg profile handler sets `x-prefiller-host-port` and `x-encoder-hosts-ports` itself from its
    prefill and encode profiles' picks, which is what these did. So `prefillProfile` must be the
    handler's prefill profile, and `encodeProfile` its encode profile or one that does not exist (no
    encode stage: no header, as in llm-d); both checked."""

    type = "disagg-headers-handler"

    def __init__(self, name: str | None = None, *, prefill_profile: str = "prefill", encode_profile: str = "encode") -> None:
        super().__init__(name)
        self.prefill_profile = prefill_profile
        self.encode_profile = encode_profile

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DisaggHeadersHandler:
        return cls(
            name,
            prefill_profile=p.string("prefillProfile", "prefill") or "prefill",
            encode_profile=p.string("encodeProfile", "encode") or "encode",
        )

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        if not isinstance(handler, DisaggProfileHandler):
            raise ParameterError(
                "", f"sets the prefill header of a {DisaggProfileHandler.type} or {PdProfileHandler.type}, and the config has none"
            )
        if self.encode_profile in profiles and self.encode_profile != handler.encode_profile:
            raise ParameterError(
                "encodeProfile",
                f"{shown(self.encode_profile)} differs from the profile handler's encode profile "
                f"{shown(handler.encode_profile)}, whose picks llm-epp puts in {ENCODERS_HEADER}",
            )
        if self.prefill_profile != handler.prefill_profile:
            raise ParameterError(
                "prefillProfile",
                f"{shown(self.prefill_profile)} differs from the profile handler's prefill profile "
                f"{shown(handler.prefill_profile)}, whose pick llm-epp puts in {PREFILLER_HEADER}",
            )


class PrefillHeaderHandler(DisaggHeadersHandler):
    type = "prefill-header-handler"


def _decider(plugins: Mapping[str, object], name: str, param: str, examples: str) -> PdDecider:
    plugin = plugins.get(name)
    if plugin is None:
        raise ParameterError(param, f"no plugin named {shown(name)}; defined: {', '.join(plugins)}")
    if not isinstance(plugin, PdDecider):
        raise ParameterError(
            param, f"plugin {shown(name)} ({getattr(plugin, 'type', '?')}) is not a disaggregation decider such as {examples}"
        )
    return plugin


def _decode_first(p: Params) -> None:
    """llm-d's `stageOrder`, spelt as it parses it: decode-first (its default) loads, prefill-first is refused."""
    raw = p.string("stageOrder", "decode-first") or "decode-first"
    order = raw.replace("-", "").replace("_", "").lower()
    if order in ("prefillfirst", "prefill"):
        raise ParameterError(
            "stageOrder",
            "prefill-first is not supported: llm-epp runs the decode profile first (its prefill decider judges the "
            "decode pick, and the prefill profile's topology plugins compare against it); remove it or set decode-first",
        )
    if order not in ("decodefirst", "decode"):
        raise ParameterError("stageOrder", f"invalid stage order {shown(raw)}, must be decode-first or prefill-first")
    p.effective["stageOrder"] = "decode-first"


def _names(p: Params, key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    names = p.string_map(key)
    for k, v in names.items():
        if k not in allowed:
            raise ParameterError(f"{key}.{k}", f"unknown key; expected one of {', '.join(allowed)}")
        if not v:
            raise ParameterError(f"{key}.{k}", "expected a non-empty name")
    return names
