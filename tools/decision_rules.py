"""Searches decision-placement rules on `kensa eval --json` outputs, with leave-one-class-out.

Each run of `kensa eval` stores its bank's calibration populations (pseudo-normal and
pseudo-anomalous image scores) and every test image's score. A rule places the decision from
the populations alone; this script fits each family's parameters on all classes but one and
reports the accuracy on the class left out (what a new product would see), beside the rule the
bank uses now and the best threshold chosen on the test images themselves.

    for c in CLASSES; do kensa eval --data ../shared/data/$c --shots 1,2,4,8,16 --runs 3 --json $c.json; done
    python3 tools/decision_rules.py *.json
"""
import json, sys, glob, itertools, math, statistics as st
runs = []
for f in sys.argv[1:]:
    runs += json.load(open(f))["runs"]
def q(v, p):
    v = sorted(v); return v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))]
def acc(t, sc): return sum((s >= t) == lab for _, s, lab in sc) / len(sc)
classes = sorted({r["class"] for r in runs})
pre = []
for r in runs:
    c = r["calibration"]
    pre.append((r["class"], r["shots"], c["normal_scores"], c["anomaly_scores"], r["scores"], c["image_threshold"]))
def evaluate(rule, params, sel):
    by = {}
    for cl, k, n, a, sc, t0 in pre:
        if not sel(cl, k): continue
        by.setdefault((cl, k), []).append(acc(rule(params, n, a, k), sc))
    return {kk: st.mean(v) for kk, v in by.items()}
fams = {
  "interp": (lambda P, n, a, k: q(n, P[0]) + P[2] * (q(a, P[1]) - q(n, P[0])),
             list(itertools.product([0.5, 0.75, 0.9, 1.0], [0.0, 0.1, 0.25, 0.5], [x / 20 for x in range(21)]))),
  "loginterp": (lambda P, n, a, k: math.exp(math.log(q(n, P[0])) + P[2] * (math.log(q(a, P[1])) - math.log(q(n, P[0])))),
             list(itertools.product([0.5, 0.75, 0.9, 1.0], [0.0, 0.1, 0.25, 0.5], [x / 20 for x in range(21)]))),
  "mult": (lambda P, n, a, k: q(n, P[0]) * P[1],
             list(itertools.product([0.25, 0.5, 0.75, 0.9, 1.0], [0.8 + x / 50 for x in range(31)]))),
  "spread": (lambda P, n, a, k: q(n, P[0]) + P[2] * (q(n, P[0]) - q(n, P[1])),
             list(itertools.product([0.5, 0.75, 0.9, 1.0], [0.0, 0.1, 0.25, 0.5], [x / 10 for x in range(-5, 21)]))),
}
regimes = {"K=1": lambda k: k == 1, "K=2,4": lambda k: k in (2, 4), "K=8,16": lambda k: k >= 8, "K>=2": lambda k: k >= 2}
for rname, rk in regimes.items():
    base = {}
    for cl, k, n, a, sc, t0 in pre:
        if rk(k): base.setdefault(cl, []).append(acc(t0, sc))
    print(f"\n== {rname}: current mean {st.mean(st.mean(v) for v in base.values()):.3f}  per class " + " ".join(f"{c[:8]} {st.mean(v):.3f}" for c, v in sorted(base.items())))
    for fname, (rule, grid) in fams.items():
        def m_over(cls):
            best = None
            for P in grid:
                res = evaluate(rule, P, lambda c, k: c in cls and rk(k))
                m = st.mean(res.values())
                if best is None or m > best[0]: best = (m, P)
            return best
        allb = m_over(classes)
        held = []
        for h in classes:
            b = m_over([c for c in classes if c != h])
            res = evaluate(rule, b[1], lambda c, k: c == h and rk(k))
            held.append((h, st.mean(res.values()), b[1]))
        print(f"  {fname:10} all-fit {allb[0]:.3f} {allb[1]}  LOCO mean {st.mean(x[1] for x in held):.3f}  " + " ".join(f"{h[:8]} {v:.3f}" for h, v, _ in held))
