"""Running linear fits with a prior: O(1) memory and time per observation, for the latency model.

A fit says y ~ c0 + c1*u (+ c2*v), in the least-squares sense of relative errors: each observation
weighs 1 / its predicted value squared, since latencies span three orders of magnitude and a miss
matters in proportion. Its data sums decay by `decay` at every observation, so about 1 / (1 - decay)
recent observations count and the fit follows a server whose speed drifts.

The prior gives the fit its shape (how overhead, per-token and per-request costs compare) and the data
its size: the prior's coefficients are scaled by the running geometric mean of observed / prior-
predicted, so one response from a CPU box makes the prior a CPU-sized one. It counts as
`prior_weight` observations of each coefficient apart (weighed as data is), fading as data comes: it
is what the fit says before data comes, and a pull toward sane numbers while the data cannot yet tell
the features apart (every prompt the same length, say).

Robust to outliers: once warm, an observation whose relative residual is far beyond the running mean
absolute one is clipped to that bound before it is counted, so one stalled request moves the fit by a
bounded amount, while a server that really changed speed widens the bound within a few observations.

The normal equations are solved after every observation while the fit is young, then every
`SOLVE_EVERY` observations, and whenever a prediction needs the coefficients (`coefficients()`).

Nothing here knows what the features mean (pickers.latency.model does); nothing here imports pickers.
"""

from __future__ import annotations

import math

# The relative residual bound: CLIP x the running mean |relative residual|, never tighter than MIN_CLIP.
CLIP = 4.0
MIN_CLIP = 0.25
SCALE_ALPHA = 0.05  # how fast the residual scale follows
# Relative residuals are taken against max(prediction, a quarter of the mean observation): a step's
# worth of queueing noise on a short request is no outlier.
MEAN_SHARE = 0.25
SOLVE_EVERY = 4  # observations between solves once warm, unless a prediction asks sooner
RATIO_UNTIL = 10  # the prior's size follows the data for this many times warm_after observations


class RunningFit:
    """What both fits share: the counts, the residual scale, the prior's size and fade."""

    __slots__ = ("decay", "warm_after", "n", "clipped", "scale", "weight", "mean", "log_ratio", "solved_at", "dirty")

    def __init__(self, decay: float, warm_after: int) -> None:
        self.decay = decay
        self.warm_after = warm_after
        self.n = 0  # observations counted
        self.clipped = 0  # of which clipped as outliers
        self.scale = 0.5  # running mean |relative residual|; 0.5 until data says otherwise
        self.weight = 0.0  # the data's decayed count (how many observations the fit holds now)
        self.mean = 0.0  # running mean of the observations
        self.log_ratio = 0.0  # running mean of log(observed / the prior's prediction)
        self.solved_at = 0  # `n` at the last solve
        self.dirty = False  # observations since the last solve

    @property
    def ratio(self) -> float:
        """How much slower than the prior the server is (the geometric mean of observed / prior)."""
        return math.exp(self.log_ratio)

    def _count(self, y: float, predicted: float, prior_predicted: float) -> tuple[float, float]:
        """Count observation `y` (the fit predicted `predicted`, the bare prior `prior_predicted`):
        the value to add to the sums (clipped when an outlier) and its weight."""
        n = self.n
        # the prior's size; once it has faded (1% by ten times warm_after) its size no longer matters
        if y > 0.0 and prior_predicted > 0.0 and n < RATIO_UNTIL * self.warm_after:
            r = math.log(y / prior_predicted)
            self.log_ratio += (r - self.log_ratio) / (n + 1) if n < self.warm_after else (1.0 - self.decay) * (r - self.log_ratio)
        if n < self.warm_after:  # the prior may be far off: weigh by the data's size, not by it
            self.mean += (y - self.mean) / (n + 1)
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
        self.n = n = n + 1
        self.weight = self.weight * self.decay + 1.0
        self.dirty = True
        if n > self.warm_after and mag > limit:
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
    """y ~ c0 + c1*u, with c1 >= c1_floor x ratio and c0 >= 0."""

    __slots__ = ("p11", "p22", "q1", "q2", "s1", "su", "suu", "sy", "suy", "c0", "c1", "c1_floor", "prior")

    def __init__(self, c0: float, c1: float, u_ref: float, prior_weight: float, decay: float, warm_after: int) -> None:
        super().__init__(decay, warm_after)
        # the prior as an independent pull on each coefficient (a diagonal of the normal equations),
        # each term weighed as a typical observation is (1 / its value squared, at u = u_ref)
        y2 = (c0 + c1 * u_ref) ** 2
        self.p11, self.p22 = prior_weight / y2, prior_weight * u_ref**2 / y2
        self.q1, self.q2 = self.p11 * c0, self.p22 * c1
        self.s1 = self.su = self.suu = self.sy = self.suy = 0.0
        self.c0, self.c1 = c0, c1
        self.prior = (c0, c1)
        self.c1_floor = c1 / 100

    def coefficients(self) -> tuple[float, float]:
        if self.dirty:
            self.solve()
        return self.c0, self.c1

    def observe(self, u: float, y: float) -> float:
        """Count `y` observed at `u`; returns what the fit predicted there before it."""
        p0, p1 = self.prior
        predicted = self.c0 + self.c1 * u
        y, w = self._count(y, predicted, p0 + p1 * u)
        g = self.decay
        wu = w * u
        self.s1 = self.s1 * g + w
        self.su = self.su * g + wu
        self.suu = self.suu * g + wu * u
        self.sy = self.sy * g + w * y
        self.suy = self.suy * g + wu * y
        n = self.n
        if n <= self.warm_after or n - self.solved_at >= SOLVE_EVERY:
            self.solve()
        return predicted

    def solve(self) -> None:
        self.dirty, self.solved_at = False, self.n
        ratio = self.ratio
        kr = self._prior_scale() / ratio  # the prior at the data's size: weights / ratio^2, values x ratio
        k = kr / ratio
        a11, a12, a22 = k * self.p11 + self.s1, self.su, k * self.p22 + self.suu
        b1, b2 = kr * self.q1 + self.sy, kr * self.q2 + self.suy
        det = a11 * a22 - a12 * a12
        if det <= 0.0:
            return
        c1 = (a11 * b2 - a12 * b1) / det
        floor = self.c1_floor * ratio
        if c1 < floor:  # a slope the data cannot support: keep the floor, refit the intercept
            c1 = floor
        c0 = (b1 - a12 * c1) / a11
        self.c0, self.c1 = (c0 if c0 > 0.0 else 0.0), c1


class Fit3(RunningFit):
    """y ~ c0 + c1*u + c2*v, with c1 >= c1_floor x ratio and c0, c2 >= 0."""

    __slots__ = ("p", "q", "s1", "su", "sv", "suu", "suv", "svv", "sy", "suy", "svy", "c0", "c1", "c2", "c1_floor", "prior")

    def __init__(
        self, coef: tuple[float, float, float], ref: tuple[float, float], prior_weight: float, decay: float, warm_after: int
    ) -> None:
        super().__init__(decay, warm_after)
        c0, c1, c2 = coef
        u_ref, v_ref = ref
        # the prior as an independent pull on each coefficient (the diagonal 11, 22, 33 of the normal
        # equations), each term weighed as a typical observation is (1 / its value squared at the
        # reference point): data that cannot tell two coefficients apart leaves them where the prior
        # puts them instead of trading one for the other
        y2 = (c0 + c1 * u_ref + c2 * v_ref) ** 2
        self.p = (prior_weight / y2, prior_weight * u_ref**2 / y2, prior_weight * v_ref**2 / y2)
        self.q = (self.p[0] * c0, self.p[1] * c1, self.p[2] * c2)
        self.s1 = self.su = self.sv = self.suu = self.suv = self.svv = self.sy = self.suy = self.svy = 0.0
        self.c0, self.c1, self.c2 = c0, c1, c2
        self.prior = coef
        self.c1_floor = c1 / 100

    def coefficients(self) -> tuple[float, float, float]:
        if self.dirty:
            self.solve()
        return self.c0, self.c1, self.c2

    def observe(self, u: float, v: float, y: float) -> float:
        """Count `y` observed at (u, v); returns what the fit predicted there before it."""
        p0, p1, p2 = self.prior
        predicted = self.c0 + self.c1 * u + self.c2 * v
        y, w = self._count(y, predicted, p0 + p1 * u + p2 * v)
        g = self.decay
        wu, wv = w * u, w * v
        self.s1 = self.s1 * g + w
        self.su = self.su * g + wu
        self.sv = self.sv * g + wv
        self.suu = self.suu * g + wu * u
        self.suv = self.suv * g + wu * v
        self.svv = self.svv * g + wv * v
        self.sy = self.sy * g + w * y
        self.suy = self.suy * g + wu * y
        self.svy = self.svy * g + wv * y
        n = self.n
        if n <= self.warm_after or n - self.solved_at >= SOLVE_EVERY:
            self.solve()
        return predicted

    def solve(self) -> None:
        self.dirty, self.solved_at = False, self.n
        p, q, ratio = self.p, self.q, self.ratio
        kr = self._prior_scale() / ratio  # the prior at the data's size: weights / ratio^2, values x ratio
        k = kr / ratio
        a11, a12, a13, a22, a23, a33 = k * p[0] + self.s1, self.su, self.sv, k * p[1] + self.suu, self.suv, k * p[2] + self.svv
        b1, b2, b3 = kr * q[0] + self.sy, kr * q[1] + self.suy, kr * q[2] + self.svy
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
        floor = self.c1_floor * ratio
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
