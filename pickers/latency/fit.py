"""Running linear fits with a prior: O(1) memory and time per observation, for the latency model.

A fit says y ~ c0 + c1*u (+ c2*v), in the least-squares sense of relative errors (each observation
weighs 1 / its predicted value squared: latencies vary over three orders of magnitude and a miss
matters in proportion). Its data sums decay by `decay` at every observation, so about
1 / (1 - decay) recent observations count and the fit follows a server whose speed drifts; the prior
gives the fit its shape (how overhead, per-token and per-request costs compare) and the data its
size: the prior's coefficients are scaled by the running geometric mean of observed / prior-predicted
(so one response from a CPU box makes the prior a CPU-sized one), counted as a few observations
of each coefficient apart (weighed as data is), fading as data comes. It is what the fit says before data comes,
and a pull toward sane numbers while the data cannot yet tell the features apart (every prompt the
same length, say). Robust to outliers: once warm, an observation whose
relative residual is far beyond the running mean absolute one is clipped to that bound before it is
counted, so one stalled request moves the fit by a bounded amount, while a server that really
changed speed widens the bound within a few observations.

Nothing here knows what the features mean (pickers.latency.model does); nothing here imports pickers.
"""

from __future__ import annotations

import math

# The relative residual bound: CLIP x the running mean |relative residual|, never tighter than MIN_CLIP.
CLIP = 4.0
MIN_CLIP = 0.25
SCALE_ALPHA = 0.05  # how fast the residual scale follows
# relative residuals are taken against max(prediction, a quarter of the mean observation): a step's
# worth of queueing noise on a short request is no outlier
MEAN_SHARE = 0.25


class RunningFit:
    """The residual bookkeeping both fits share: how many observations, how many clipped, the scale."""

    __slots__ = ("decay", "warm_after", "n", "clipped", "scale", "weight", "mean", "log_ratio", "ratio")

    def __init__(self, decay: float, warm_after: int) -> None:
        self.decay = decay
        self.warm_after = warm_after
        self.n = 0  # observations counted
        self.clipped = 0  # of which clipped as outliers
        self.scale = 0.5  # running mean |relative residual|; 0.5 until data says otherwise
        self.weight = 0.0  # the data's decayed weight (how many observations the fit holds now)
        self.mean = 0.0  # running mean of the observations
        self.log_ratio = 0.0  # running mean of log(observed / the prior's prediction)
        self.ratio = 1.0  # exp(log_ratio): how much slower than the prior the server is

    def _rescale(self, y: float, prior_predicted: float) -> None:
        """Follow observed / prior-predicted (before `_robust` counts the observation)."""
        if y <= 0.0 or prior_predicted <= 0.0:
            return
        r = math.log(y / prior_predicted)
        if self.n < self.warm_after:
            self.log_ratio += (r - self.log_ratio) / (self.n + 1)
        else:
            self.log_ratio += (1.0 - self.decay) * (r - self.log_ratio)
        self.ratio = math.exp(self.log_ratio)

    def _robust(self, y: float, predicted: float) -> tuple[float, float]:
        """The value to count for observation `y` given the fit's prediction, and its weight: the fit
        minimizes relative errors (a 50 ms miss on a 100 ms request weighs what a 5 s miss on a 10 s
        one does), so each observation weighs 1 / its scale squared."""
        if self.n < self.warm_after:  # the prior may be far off: weigh by the data's size, not by it
            self.mean += (y - self.mean) / (self.n + 1)
            floor = self.mean
        else:
            self.mean += SCALE_ALPHA * (y - self.mean)
            floor = MEAN_SHARE * self.mean
        base = predicted if predicted > floor else floor
        if base <= 0.0:
            base = 1e-3
        rel = (y - predicted) / base
        mag = -rel if rel < 0 else rel
        limit = CLIP * self.scale
        if limit < MIN_CLIP:
            limit = MIN_CLIP
        # the scale follows the residuals, but one huge outlier moves it by a bounded step
        self.scale += SCALE_ALPHA * ((mag if mag < 2 * limit else 2 * limit) - self.scale)
        self.n += 1
        if self.n > self.warm_after and mag > limit:
            self.clipped += 1
            y = predicted + (limit if rel > 0 else -limit) * base
        return y, 1.0 / (base * base)

    def _prior_scale(self) -> float:
        """How much the prior still counts, fading as data comes: in full before any, a quarter by
        `warm_after` observations, 1% by ten times that, so a prior whose shape is not the server's
        does not bias a warm fit."""
        f = self.warm_after / (self.warm_after + self.n)
        return f * f


class Fit2(RunningFit):
    """y ~ c0 + c1*u, with c1 >= c1_floor and c0 >= 0."""

    __slots__ = ("p11", "p12", "p22", "q1", "q2", "s1", "su", "suu", "sy", "suy", "c0", "c1", "c1_floor", "prior")

    def __init__(self, c0: float, c1: float, u_ref: float, prior_weight: float, decay: float, warm_after: int) -> None:
        super().__init__(decay, warm_after)
        # the prior as an independent pull on each coefficient (a diagonal of the normal equations),
        # each term weighed as a typical observation is (1 / its value squared, at u = u_ref)
        y_ref = c0 + c1 * u_ref
        self.p11 = prior_weight / y_ref**2
        self.p12 = 0.0
        self.p22 = prior_weight * u_ref**2 / y_ref**2
        self.q1 = self.p11 * c0
        self.q2 = self.p22 * c1
        self.s1 = self.su = self.suu = self.sy = self.suy = 0.0
        self.c0, self.c1 = c0, c1
        self.prior = (c0, c1)
        self.c1_floor = c1 / 100

    def predict(self, u: float) -> float:
        return self.c0 + self.c1 * u

    def observe(self, u: float, y: float) -> None:
        p0, p1 = self.prior
        self._rescale(y, p0 + p1 * u)
        y, w = self._robust(y, self.c0 + self.c1 * u)
        g = self.decay
        self.weight = self.weight * g + 1.0
        self.s1 = s1 = self.s1 * g + w
        wu = w * u
        self.su = self.su * g + wu
        self.suu = self.suu * g + wu * u
        self.sy = self.sy * g + w * y
        self.suy = self.suy * g + wu * y
        kr = self._prior_scale() / self.ratio  # the prior at the data's size: weights / ratio^2, values x ratio
        k = kr / self.ratio
        a11, a12, a22 = k * self.p11 + s1, k * self.p12 + self.su, k * self.p22 + self.suu
        b1, b2 = kr * self.q1 + self.sy, kr * self.q2 + self.suy
        det = a11 * a22 - a12 * a12
        if det <= 0.0:
            return
        c1 = (a11 * b2 - a12 * b1) / det
        floor = self.c1_floor * self.ratio
        if c1 < floor:  # a slope the data cannot support: keep the floor, refit the intercept
            c1 = floor
        c0 = (b1 - a12 * c1) / a11
        self.c0, self.c1 = (c0 if c0 > 0.0 else 0.0), c1


class Fit3(RunningFit):
    """y ~ c0 + c1*u + c2*v, with c1 >= c1_floor and c0, c2 >= 0."""

    __slots__ = ("p", "q", "s1", "su", "sv", "suu", "suv", "svv", "sy", "suy", "svy", "c0", "c1", "c2", "c1_floor", "prior")

    def __init__(
        self, coef: tuple[float, float, float], ref: tuple[float, float], prior_weight: float, decay: float, warm_after: int
    ) -> None:
        super().__init__(decay, warm_after)
        c0, c1, c2 = coef
        u_ref, v_ref = ref
        # the prior as an independent pull on each coefficient (a diagonal of the normal equations,
        # upper triangle (11, 12, 13, 22, 23, 33)), each term weighed as a typical observation is
        # (1 / its value squared, at the reference point): data that cannot tell two coefficients
        # apart leaves them where the prior puts them instead of trading one for the other
        y2 = (c0 + c1 * u_ref + c2 * v_ref) ** 2
        p = (prior_weight / y2, 0.0, 0.0, prior_weight * u_ref**2 / y2, 0.0, prior_weight * v_ref**2 / y2)
        self.p = p
        self.q = (p[0] * c0, p[3] * c1, p[5] * c2)
        self.s1 = self.su = self.sv = self.suu = self.suv = self.svv = self.sy = self.suy = self.svy = 0.0
        self.c0, self.c1, self.c2 = c0, c1, c2
        self.prior = coef
        self.c1_floor = c1 / 100

    def predict(self, u: float, v: float) -> float:
        return self.c0 + self.c1 * u + self.c2 * v

    def observe(self, u: float, v: float, y: float) -> None:
        p0, p1, p2 = self.prior
        self._rescale(y, p0 + p1 * u + p2 * v)
        y, w = self._robust(y, self.c0 + self.c1 * u + self.c2 * v)
        g = self.decay
        self.weight = self.weight * g + 1.0
        wu, wv = w * u, w * v
        self.s1 = s1 = self.s1 * g + w
        self.su = su = self.su * g + wu
        self.sv = sv = self.sv * g + wv
        self.suu = suu = self.suu * g + wu * u
        self.suv = suv = self.suv * g + wu * v
        self.svv = svv = self.svv * g + wv * v
        self.sy = sy = self.sy * g + w * y
        self.suy = suy = self.suy * g + wu * y
        self.svy = svy = self.svy * g + wv * y
        p, q = self.p, self.q
        kr = self._prior_scale() / self.ratio  # the prior at the data's size: weights / ratio^2, values x ratio
        k = kr / self.ratio
        a11, a12, a13, a22, a23, a33 = k * p[0] + s1, k * p[1] + su, k * p[2] + sv, k * p[3] + suu, k * p[4] + suv, k * p[5] + svv
        b1, b2, b3 = kr * q[0] + sy, kr * q[1] + suy, kr * q[2] + svy
        # Cramer's rule on the symmetric 3x3 system
        m11 = a22 * a33 - a23 * a23
        m12 = a12 * a33 - a23 * a13
        m13 = a12 * a23 - a22 * a13
        det = a11 * m11 - a12 * m12 + a13 * m13
        if det <= 0.0:
            return
        c0 = (b1 * m11 - a12 * (b2 * a33 - a23 * b3) + a13 * (b2 * a23 - a22 * b3)) / det
        c1 = (a11 * (b2 * a33 - a23 * b3) - b1 * m12 + a13 * (a12 * b3 - b2 * a13)) / det
        c2 = (a11 * (a22 * b3 - b2 * a23) - a12 * (a12 * b3 - b2 * a13) + b1 * m13) / det
        floor = self.c1_floor * self.ratio
        if c1 < floor or c2 < 0.0:
            # outside what a server can be (faster than the floor, or faster with a bigger batch): fix
            # the offending coefficient at its bound and solve the other two (a 2x2 system)
            if c1 < floor:
                c1 = floor
                r1, r3 = b1 - a12 * c1, b3 - a23 * c1
                d = a11 * a33 - a13 * a13
                c2 = (a11 * r3 - a13 * r1) / d if d > 0.0 else 0.0
                if c2 < 0.0:
                    c2 = 0.0
                c0 = (r1 - a13 * c2) / a11
            else:
                c2 = 0.0
                d = a11 * a22 - a12 * a12
                c1 = (a11 * b2 - a12 * b1) / d if d > 0.0 else floor
                if c1 < floor:
                    c1 = floor
                c0 = (b1 - a12 * c1) / a11
        self.c0, self.c1, self.c2 = (c0 if c0 > 0.0 else 0.0), c1, c2
