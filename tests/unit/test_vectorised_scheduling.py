"""The vectorised scheduler (endpoint columns, scores as arrays, the compact prefix index, the latency
model's coefficient columns) decides exactly as the loop-per-endpoint one did: on the same seeded
inputs, the same endpoints and the same scores, digit for digit (tests/unit/scheduling_trace.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.scheduler import Scheduler
from pickers.framework.request import InferenceRequest
from pickers.framework.types import SchedulingProfile, WeightedScorer
from pickers.plugins.picker.max_score import MaxScorePicker
from tests.unit.scheduling_trace import CONFIGS, digest, trace

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "scheduling-reference.json").read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_every_pick_and_score_is_the_loop_per_endpoint_schedulers(config):
    got, want = digest(trace(config)), REFERENCE[config]
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{config}: pick {k} differs"


class _Fixed:
    type = name = "fixed"
    category = "distribution"

    def __init__(self, scores):
        self.scores = scores

    def score(self, request, cycle, endpoints):
        return self.scores


def _eps(n):
    return [Endpoint(EndpointSpec(f"e{i}", f"10.0.0.{i}", 80), Metrics()) for i in range(n)]


def test_a_plain_list_of_scores_is_clamped_and_weighted_as_an_array_is():
    eps = _eps(3)
    req = InferenceRequest("r", "/v1/completions", {})
    for scores in ([-1.0, 0.5, 7.0], np.array([-1.0, 0.5, 7.0])):
        profile = SchedulingProfile("p", MaxScorePicker(rng=random.Random(0)), [WeightedScorer(_Fixed(scores), 2.0)])
        result = Scheduler(profile, explain=True).schedule(req, eps)
        assert result.endpoints == [eps[2]]
        assert result.scores["total"] == {"10.0.0.0:80": 0.0, "10.0.0.1:80": 1.0, "10.0.0.2:80": 2.0}


def test_a_scorer_that_returns_the_wrong_number_of_scores_is_named():
    profile = SchedulingProfile("p", MaxScorePicker(rng=random.Random(0)), [WeightedScorer(_Fixed([1.0]), 1.0)])
    with pytest.raises(ValueError, match="scorer fixed returned 1 scores for 3 endpoints"):
        Scheduler(profile).schedule(InferenceRequest("r", "/v1/completions", {}), _eps(3))
