"""Running linear fits with a prior: O(1) memory and time per observation, for the latency model.

A fit says y ~ c0 + c1*u (+ c2*v), in the least-squares sense of relative errors (each observation
weighs 1 / its predicted value squared: latencies vary over three orders of magnitude and a miss
matters in proportion). Its data sums decay by `decay` at every observation, so about
1 / (1 - decay) recent observations count and the fit follows a server whose speed drifts; the prior
counts as a few observations spread over representative points and fades as data comes, so it is
what the fit says before data comes and a pull toward sane numbers while the data cannot yet tell
the features apart (every prompt the same length, say). Robust to outliers: once warm, an observation whose
relative residual is far beyond the running mean absolute one is clipped to that bound before it is
counted, so one stalled request moves the fit by a bounded amount, while a server that really
changed speed widens the bound within a few observations.

Nothing here knows what the features mean (pickers.latency.model does); nothing here imports pickers.
"""

from __future__ import annotations

# The relative residual bound: CLIP x the running mean |relative residual|, never tighter than MIN_CLIP.
CLIP = 4.0
MIN_CLIP = 0.25
SCALE_ALPHA = 0.05  # how fast the residual scale follows
# relative residuals are taken against max(prediction, a quarter of the mean observation): a step's
# worth of queueing noise on a short request is no outlier
MEAN_SHARE = 0.25


class RunningFit:
    """The residual bookkeeping both fits share: how many observations, how many clipped, the scale."""

    __slots__ = ("decay", "warm_after", "n", "clipped", "scale", "weight", "mean")

    def __init__(self, decay: float, warm_after: int) -> None:
        self.decay = decay
        self.warm_after = warm_after
        self.n = 0  # observations counted
        self.clipped = 0  # of which clipped as outliers
        self.scale = 0.5  # running mean |relative residual|; 0.5 until data says otherwise
        self.weight = 0.0  # the data's decayed weight (how many observations the fit holds now)
        self.mean = 0.0  # running mean of the observations

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

    def _prior_scale(self, s1: float) -> float:
        """The prior counts as so many observations of the data's mean weight, fading as data comes:
        by `warm_after` observations it counts half, by 20 times that 5%, so a prior far from the
        server (a GPU prior on a CPU box) does not bias a warm fit. Called after an observation."""
        return s1 / self.weight * self.warm_after / (self.warm_after + self.n)


class Fit2(RunningFit):
    """y ~ c0 + c1*u, with c1 >= c1_floor and c0 >= 0."""

    __slots__ = ("p11", "p12", "p22", "q1", "q2", "s1", "su", "suu", "sy", "suy", "c0", "c1", "c1_floor")

    def __init__(self, c0: float, c1: float, points: tuple[float, ...], prior_weight: float, decay: float, warm_after: int) -> None:
        super().__init__(decay, warm_after)
        w = prior_weight / len(points)
        # the prior as pseudo-observations of c0 + c1*u at each point: its normal equations
        self.p11 = w * len(points)
        self.p12 = w * sum(points)
        self.p22 = w * sum(u * u for u in points)
        self.q1 = self.p11 * c0 + self.p12 * c1
        self.q2 = self.p12 * c0 + self.p22 * c1
        self.s1 = self.su = self.suu = self.sy = self.suy = 0.0
        self.c0, self.c1 = c0, c1
        self.c1_floor = c1 / 100

    def predict(self, u: float) -> float:
        return self.c0 + self.c1 * u

    def observe(self, u: float, y: float) -> None:
        y, w = self._robust(y, self.c0 + self.c1 * u)
        g = self.decay
        self.weight = self.weight * g + 1.0
        self.s1 = s1 = self.s1 * g + w
        wu = w * u
        self.su = self.su * g + wu
        self.suu = self.suu * g + wu * u
        self.sy = self.sy * g + w * y
        self.suy = self.suy * g + wu * y
        k = self._prior_scale(s1)
        a11, a12, a22 = k * self.p11 + s1, k * self.p12 + self.su, k * self.p22 + self.suu
        b1, b2 = k * self.q1 + self.sy, k * self.q2 + self.suy
        det = a11 * a22 - a12 * a12
        if det <= 0.0:
            return
        c1 = (a11 * b2 - a12 * b1) / det
        if c1 < self.c1_floor:  # a slope the data cannot support: keep the floor, refit the intercept
            c1 = self.c1_floor
        c0 = (b1 - a12 * c1) / a11
        self.c0, self.c1 = (c0 if c0 > 0.0 else 0.0), c1


class Fit3(RunningFit):
    """y ~ c0 + c1*u + c2*v, with c1 >= c1_floor and c0, c2 >= 0."""

    __slots__ = ("p", "q", "s1", "su", "sv", "suu", "suv", "svv", "sy", "suy", "svy", "c0", "c1", "c2", "c1_floor")

    def __init__(
        self, coef: tuple[float, float, float], points: tuple[tuple[float, float], ...], prior_weight: float, decay: float, warm_after: int
    ) -> None:
        super().__init__(decay, warm_after)
        w = prior_weight / len(points)
        c0, c1, c2 = coef
        # the prior's normal equations, upper triangle: (11, 12, 13, 22, 23, 33)
        p = [0.0] * 6
        for u, v in points:
            p[0] += w
            p[1] += w * u
            p[2] += w * v
            p[3] += w * u * u
            p[4] += w * u * v
            p[5] += w * v * v
        self.p = tuple(p)
        self.q = (p[0] * c0 + p[1] * c1 + p[2] * c2, p[1] * c0 + p[3] * c1 + p[4] * c2, p[2] * c0 + p[4] * c1 + p[5] * c2)
        self.s1 = self.su = self.sv = self.suu = self.suv = self.svv = self.sy = self.suy = self.svy = 0.0
        self.c0, self.c1, self.c2 = c0, c1, c2
        self.c1_floor = c1 / 100

    def predict(self, u: float, v: float) -> float:
        return self.c0 + self.c1 * u + self.c2 * v

    def observe(self, u: float, v: float, y: float) -> None:
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
        p, q, k = self.p, self.q, self._prior_scale(s1)
        a11, a12, a13, a22, a23, a33 = k * p[0] + s1, k * p[1] + su, k * p[2] + sv, k * p[3] + suu, k * p[4] + suv, k * p[5] + svv
        b1, b2, b3 = k * q[0] + sy, k * q[1] + suy, k * q[2] + svy
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
        if c1 < self.c1_floor or c2 < 0.0:
            # outside what a server can be (faster than the floor, or faster with a bigger batch): fix
            # the offending coefficient at its bound and solve the other two (a 2x2 system)
            if c1 < self.c1_floor:
                c1 = self.c1_floor
                r1, r3 = b1 - a12 * c1, b3 - a23 * c1
                d = a11 * a33 - a13 * a13
                c2 = (a11 * r3 - a13 * r1) / d if d > 0.0 else 0.0
                if c2 < 0.0:
                    c2 = 0.0
                c0 = (r1 - a13 * c2) / a11
            else:
                c2 = 0.0
                d = a11 * a22 - a12 * a12
                c1 = (a11 * b2 - a12 * b1) / d if d > 0.0 else self.c1_floor
                if c1 < self.c1_floor:
                    c1 = self.c1_floor
                c0 = (b1 - a12 * c1) / a11
        self.c0, self.c1, self.c2 = (c0 if c0 > 0.0 else 0.0), c1, c2
