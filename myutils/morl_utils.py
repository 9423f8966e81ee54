"""Multi-objective RL bookkeeping (PGMORL, Xu et al. 2020; DESIGN.md section 9). Every objective is
maximised. A population of policies, each trained on its own weight vector w over the reward
vector r; after a warm-up, each generation predicts how every policy would improve under candidate
weights, greedily picks the (policy, weight) tasks whose predicted points maximise
hypervolume - sparsity_weight x sparsity of the front, trains them and keeps a Pareto archive.

Simplification (stated in the README): PGMORL fits a saturating hyperbolic model of improvement
against weight change per policy; here each objective's improvement is a ridge-regularised linear
function of that objective's weight, fitted to every (weight, improvement) record with the
policy's own records weighted up.
"""
import numpy as np


def dominates(a, b):
    """a Pareto-dominates b: at least as good in every objective and better in one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a >= b) and np.any(a > b))


def pareto_indices(points):
    """Indices of the non-dominated points (of equal points, the first is kept)."""
    pts = np.asarray(points, dtype=float)
    keep = []
    for i, p in enumerate(pts):
        if any(dominates(q, p) for j, q in enumerate(pts) if j != i):
            continue
        if any(np.array_equal(pts[k], p) for k in keep):
            continue
        keep.append(i)
    return keep


def hypervolume(points, reference):
    """Volume dominated by `points` and bounded by `reference` (maximisation), with pymoo's
    implementation (which minimises: both are negated). Points not better than the reference in
    every objective add nothing."""
    from pymoo.indicators.hv import HV

    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    pts = pts[np.all(pts > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(HV(ref_point=-ref)(-pts))


def sparsity(points):
    """PGMORL's sparsity of a front: sum over objectives of the squared gaps between consecutive
    values (each objective sorted on its own), divided by (number of points - 1); 0 below 2 points."""
    pts = np.asarray(points, dtype=float)
    if len(pts) < 2:
        return 0.0
    gaps = np.diff(np.sort(pts, axis=0), axis=0)
    return float((gaps ** 2).sum() / (len(pts) - 1))


def initial_weights(num_objectives, population, seed=0):
    """Weight vectors on the simplex: evenly spaced for two objectives, pymoo's Riesz-energy
    directions (evenly spread, exactly `population` of them) for more."""
    if num_objectives == 2:
        w = np.linspace(0.0, 1.0, population) if population > 1 else np.array([0.5])
        return np.stack([w, 1 - w], 1)
    from pymoo.util.ref_dirs import get_reference_directions

    return get_reference_directions("energy", num_objectives, population, seed=seed)


def candidate_weights(num_objectives, partitions):
    """The simplex lattice with `partitions` steps per objective (pymoo's Das-Dennis directions)."""
    from pymoo.util.ref_dirs import get_reference_directions

    return get_reference_directions("das-dennis", num_objectives, n_partitions=partitions)


def predict_improvement(records, policy, weights, own_weight=4.0, ridge=1e-2):
    """Predicted objective change if `policy` trains one generation with `weights`. records: list of
    {"policy", "weights", "delta"} (delta = objectives after - before one generation). Per objective
    j: weighted least squares delta_j = a_j + b_j w_j (ridge on b_j), the policy's own records
    weighted `own_weight`, the others 1. No records: zeros."""
    if not records:
        return np.zeros(len(weights))
    w = np.array([r["weights"] for r in records], dtype=float)
    d = np.array([r["delta"] for r in records], dtype=float)
    s = np.array([own_weight if r["policy"] == policy else 1.0 for r in records])
    out = np.zeros(len(weights))
    for j in range(len(weights)):
        x = np.stack([np.ones(len(w)), w[:, j]], 1)
        a = x.T @ (s[:, None] * x) + np.diag([0.0, ridge]) + 1e-12 * np.eye(2)
        coef = np.linalg.solve(a, x.T @ (s * d[:, j]))
        out[j] = coef[0] + coef[1] * weights[j]
    return out


def normalise(points, reference, scale):
    return (np.asarray(points, dtype=float) - np.asarray(reference)) / np.asarray(scale)


def select_tasks(front, candidates, count, reference, sparsity_weight=0.5):
    """Greedy PGMORL task selection. front: current archive points; candidates: list of
    (policy, weights, predicted point); pick `count` distinct candidates, each maximising
    hypervolume - sparsity_weight x sparsity of the front of (archive + picked predictions + it).
    Objectives are scaled to [0, 1] between the reference and the best value seen, so the two
    terms do not depend on the objectives' units. Returns the picked candidates in order."""
    every = np.array([c[2] for c in candidates] + list(front), dtype=float)
    scale = np.maximum(every.max(0) - np.asarray(reference), 1e-12)
    ref01 = np.zeros(len(reference))
    chosen, pool, base = [], list(range(len(candidates))), [normalise(p, reference, scale) for p in front]
    for _ in range(min(count, len(candidates))):
        best, best_score = None, -np.inf
        for i in pool:
            pts = np.array(base + [normalise(candidates[k][2], reference, scale) for k in chosen]
                           + [normalise(candidates[i][2], reference, scale)])
            nd = pts[pareto_indices(pts)]
            score = hypervolume(nd, ref01) - sparsity_weight * sparsity(nd)
            if score > best_score:
                best, best_score = i, score
        chosen.append(best)
        pool.remove(best)
    return [candidates[i] for i in chosen]


class ParetoArchive:
    """Non-dominated (policy snapshot, weights, objectives) entries seen so far; checkpointable."""

    def __init__(self):
        self.entries = []

    def add(self, entry):
        """Insert {"name", "weights", "objectives", ...}; returns (added, names of entries it removed)."""
        obj = entry["objectives"]
        if any(dominates(e["objectives"], obj) or np.array_equal(e["objectives"], obj) for e in self.entries):
            return False, []
        removed = [e["name"] for e in self.entries if dominates(obj, e["objectives"])]
        self.entries = [e for e in self.entries if e["name"] not in removed] + [dict(entry)]
        return True, removed

    @property
    def points(self):
        return np.array([e["objectives"] for e in self.entries], dtype=float)

    def state_dict(self):
        return {"entries": self.entries}

    def load_state_dict(self, state):
        self.entries = list(state["entries"])
