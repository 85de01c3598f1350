"""Recommendation quality on MovieLens (ml-latest-small) with a temporal split.

1. **nDCG@10, ours against implicit.** Train on the events before the 80% cut
   (:func:`factors.evaluate.temporal_split`), score the warm users' later events with
   :func:`factors.evaluate.ranking_metrics`: the same metric code for both libraries,
   run on each library's factors. Same hyperparameters (factors, regularization,
   iterations, solver, cg_steps) and confidences (implicit gets ``1 + alpha * r``, its
   ``alpha = 1``). implicit 0.7 draws its initial factors from a seed exactly as we do
   (checked here), so for each seed both start from the same factors. Medians over
   three seeds.
2. **Prequential hit@10, fold-in against stale vectors**
   (``factors.pipeline.evaluate(mode="prequential")``): replay the held-out events in
   time order, score each before learning from it, and either re-solve the user's vector
   after every event (fold-in) or keep the vectors from training (stale).

Run ``python -m bench.bench_quality`` (full) or ``--quick``; see ``--help``.
"""

from __future__ import annotations

from bench import common  # first: sets OPENBLAS_NUM_THREADS before NumPy loads  # isort: skip

from dataclasses import replace
from pathlib import Path

import numpy as np

from factors.data import read_interactions
from factors.evaluate import ranking_metrics, temporal_split
from factors.pipeline import TrainParams, evaluate, train

SECTION = "factors-quality"
CUTOFF, TOP_K = 0.8, 10
SEEDS = (0, 1, 2)

# The package defaults, the same with exact solves, and the best of a 4 x 4 grid
# (alpha in 1, 3, 10, 40; regularization in 0.05, 1, 10, 50; CG, seed 0) on this very
# split: optimistic, since it was tuned on the held-out events it is scored on.
SETTINGS = {
    "defaults": TrainParams(),
    "defaults, cholesky": TrainParams(solver="cholesky"),
    "tuned (alpha 3, reg 50)": TrainParams(alpha=3.0, regularization=50.0),
}


def implicit_factors(params: TrainParams, weights, threads: int, iterations=None):
    """implicit's user and item factors for ``params`` on aggregated raw ``weights``."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=params.factors, regularization=params.regularization, alpha=1.0,
        use_cg=params.solver == "cg", num_threads=threads, random_state=params.seed,
        iterations=params.iterations if iterations is None else iterations,
    )
    model.cg_steps = params.cg_steps
    model.fit(common.implicit_input(weights, params.alpha), show_progress=False)
    return model.user_factors, model.item_factors


def same_start(params: TrainParams, weights, threads: int) -> bool:
    """Whether implicit starts from the factors ``ImplicitALS`` draws for ``params.seed``."""
    U, V = implicit_factors(params, weights, threads, iterations=0)
    X, Y = our_initial_factors(params, weights.shape)
    return bool(np.array_equal(U, X) and np.array_equal(V, Y))


def user_vector_gap(ours, theirs, weights) -> float:
    """Median over users with training data of ``|x_ours - x_implicit| / |x_implicit|``."""
    rows = np.diff(weights.indptr) > 0
    a, b = ours[rows].astype(np.float64), theirs[rows].astype(np.float64)
    return float(np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def our_initial_factors(params: TrainParams, shape) -> tuple[np.ndarray, np.ndarray]:
    """The factors ``ImplicitALS`` starts from for ``params.seed`` (users, then items)."""
    rng = np.random.default_rng(params.seed)
    X = rng.random((shape[0], params.factors), dtype=np.float32) * np.float32(0.01)
    Y = rng.random((shape[1], params.factors), dtype=np.float32) * np.float32(0.01)
    return X, Y


def load(path: Path, quick: bool):
    """The event log, and a label saying where it came from."""
    if path.exists():
        inter, _ = read_interactions(path)
        return inter, f"`{path.parent.name}/{path.name}`"
    if not quick:
        raise SystemExit(f"{path} not found: pass --data PATH to MovieLens ratings.csv")
    from factors.synth import SynthParams, generate

    return generate(SynthParams(users=300, items=400, events=8000)), "factors.synth (no MovieLens)"


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=common.MOVIELENS_RATINGS,
                   help="MovieLens ratings.csv (userId,movieId,rating,timestamp)")
    args = p.parse_args(argv)
    threads = common.pin_threads(args.threads)

    inter, source = load(args.data, args.quick)
    seeds = SEEDS[:1] if args.quick else SEEDS
    settings = dict(list(SETTINGS.items())[:1]) if args.quick else SETTINGS
    iterations = 3 if args.quick else None
    train_part, test_part = temporal_split(inter, CUTOFF)
    common.log(f"{source}: {len(train_part):,} train / {len(test_part):,} test events")

    quality_rows, preq_rows, ratios, same_init = [], [], [], []
    for label, base in settings.items():
        base = replace(base, threads=threads, iterations=iterations or base.iterations)
        ndcg = {"ours": [], "implicit": []}
        hit = {"ours": [], "implicit": []}
        gaps = []
        users = 0
        for seed in seeds:
            params = replace(base, seed=seed)
            result = train(train_part, params)
            W = result.weights
            same_init.append(same_start(params, W, threads))
            runs = {
                "ours": (result.model.user_factors_, result.model.item_factors_),
                "implicit": implicit_factors(params, W, threads),
            }
            gaps.append(user_vector_gap(runs["ours"][0], runs["implicit"][0], W))
            for name, (U, V) in runs.items():
                metrics = ranking_metrics(U, V, W, test_part, k=TOP_K)
                ndcg[name].append(metrics["ndcg"])
                hit[name].append(metrics["hit_rate"])
                users = metrics["users"]
            common.log(f"  {label}, seed {seed}: "
                       + ", ".join(f"{n} {v[-1]:.4f}" for n, v in ndcg.items()))
        med = {name: common.median(v) for name, v in ndcg.items()}
        ratio = med["ours"] / med["implicit"] if med["implicit"] else float("nan")
        ratios.append(ratio)
        quality_rows.append([
            label,
            f"{base.alpha:g} / {base.regularization:g} / {base.solver}",
            f"{med['ours']:.4f}",
            f"{med['implicit']:.4f}",
            f"{ratio - 1:+.1%}",
            f"{min(ndcg['ours']):.4f}-{max(ndcg['ours']):.4f}",
            f"{min(ndcg['implicit']):.4f}-{max(ndcg['implicit']):.4f}",
            f"{common.median(hit['ours']):.3f} / {common.median(hit['implicit']):.3f}",
            f"{common.median(gaps):.1e}",
        ])

        preq = {"foldin": [], "stale": []}
        per_scored = {"foldin": [], "stale": []}
        counts = {}
        for seed in seeds:
            out = evaluate(inter, replace(base, seed=seed), cutoff=CUTOFF, k=TOP_K,
                           mode="prequential")
            for mode in preq:
                preq[mode].append(out[mode]["hit_rate"])
                per_scored[mode].append(out[mode]["hits"] / max(out[mode]["scored"], 1))
            counts = out["foldin"], out["stale"]
        fold, stale = common.median(preq["foldin"]), common.median(preq["stale"])
        preq_rows.append([
            label,
            f"{fold:.4f}",
            f"{stale:.4f}",
            f"{fold / stale:.1f}x" if stale else "n/a",
            f"{common.median(per_scored['foldin']):.4f} / "
            f"{common.median(per_scored['stale']):.4f}",
            f"{counts[0]['events']:,}",
            f"{counts[0]['scored']:,} / {counts[1]['scored']:,}",
            f"{counts[0]['cold']:,} / {counts[1]['cold']:,}",
            f"{counts[0]['unknown_items']:,}",
        ])
        common.log("  prequential: " + " | ".join(preq_rows[-1]))

    within = [abs(r - 1) <= 0.02 for r in ratios]
    fold_stats, stale_stats = counts
    cold_share = (stale_stats["cold"] - fold_stats["cold"]) / max(fold_stats["events"], 1)
    preq_ratios = [float(r[3].rstrip("x")) for r in preq_rows if r[3] != "n/a"] or [0.0]
    preq_low, preq_high = min(preq_ratios), max(preq_ratios)
    worst = max(abs(r - 1) for r in ratios)
    verdict = (
        f"Target (nDCG@10 within 2% of implicit) **met** for every setting "
        f"(largest gap {worst:.1%})."
        if all(within) else
        f"Target (nDCG@10 within 2% of implicit) **missed** for "
        f"{', '.join(l for l, ok in zip(settings, within) if not ok)} (largest gap {worst:.1%})."
    )
    md = "\n".join([
        f"## Quality on {source}, temporal split at {CUTOFF:g} "
        f"({len(train_part):,} train / {len(test_part):,} test events)",
        "",
        f"### nDCG@{TOP_K}, ours vs implicit (median of seeds {', '.join(map(str, seeds))})",
        "",
        common.table(["setting", "alpha / reg / solver", f"ours nDCG@{TOP_K}",
                      f"implicit nDCG@{TOP_K}", "ours vs implicit",
                      "ours range over seeds", "implicit range over seeds",
                      f"hit@{TOP_K} ours / implicit", "user vectors rel diff (median)"],
                     quality_rows),
        "",
        f"{verdict} Only {users} test users were also active before the cut (the other "
        f"users' events all fall on one side of it), so each carries 1/{users} of the mean "
        f"and a single changed rank can move nDCG by a percent or more: compare the seed "
        f"ranges, not just the medians. For each seed both libraries start from "
        f"{'identical' if all(same_init) else 'DIFFERENT (check!)'} initial factors and "
        f"end with user vectors that differ by the median relative amount in the last "
        f"column (implicit computes in float32, our kernels accumulate in float64; "
        f"inexact 3-step CG solves carry such differences from iteration to iteration)"
        + (", so the nDCG gaps are rounding made visible by the small test set, not a "
           "different model." if all(within) else "."),
        "",
        f"### Prequential hit@{TOP_K}: fold-in vs stale vectors (median of seeds)",
        "",
        common.table(["setting", f"fold-in hit@{TOP_K}", f"stale hit@{TOP_K}",
                      "fold-in / stale", f"hit@{TOP_K} per scored event fold-in / stale",
                      "test events", "scored fold-in / stale",
                      "cold (no vector) fold-in / stale", "unknown items"], preq_rows),
        "",
        f"Fold-in / stale is {preq_low:.1f}x to {preq_high:.1f}x. {cold_share:.0%} of the "
        "held-out events come from users without training events: stale vectors cannot "
        "score them (cold misses), fold-in gives those users a vector after their first "
        "event on a known item"
        + ("; that, not better vectors for known users, is most of the difference. "
           if cold_share > 0.5 else ". ")
        + "Events on items first seen after the cut are misses in both modes. The "
        "per-scored-event column compares the modes on the events each could score "
        "(different sets: fold-in's includes the users it folded in after the cut).",
        "",
        f"- Both libraries: factors 64, {base.iterations} iterations, cg_steps 3, "
        f"confidence 1 + alpha r on summed ratings; implicit gets data 1 + alpha r with its "
        f"alpha=1. Metrics for both come from `factors.evaluate.ranking_metrics` (warm users "
        f"only, training items excluded, unknown test items count as misses). "
        f"{common.environment(threads)}.",
        "- The tuned setting is the best of a small grid on this same split (optimistic).",
        "",
        f"Command: `{common.command_line()}`",
    ])
    common.publish(SECTION, md, args)


if __name__ == "__main__":
    main()
