"""Writes assets/fixtures/dp_accountant.json: epsilon of the subsampled Gaussian mechanism from
Opacus' RDPAccountant and Google's dp_accounting RdpAccountant on a table of (sampling, q, noise
multiplier, rounds, delta) cases, the reference `crates/fl/tests/accountant.rs` checks our Rust
accountant against (within 1% relative).

    python3 bench/make_dp_fixture.py      # creates .venv-bench with opacus and dp-accounting

Poisson cases use add-or-remove-one neighbours (both libraries); fixed-size sampling without
replacement uses replace-one neighbours (dp_accounting only: Opacus has no such accountant).
"""
import json
import sys
from pathlib import Path

from venv_bootstrap import ensure_venv

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "assets" / "fixtures" / "dp_accountant.json"

POISSON = [  # (q, z, rounds, delta)
    (1.0, 1.0, 1, 1e-5), (1.0, 2.0, 10, 1e-5), (1.0, 5.0, 100, 1e-5), (1.0, 0.8, 3, 1e-3),
    (0.5, 1.0, 10, 1e-5), (0.5, 1.5, 100, 1e-5), (0.2, 1.1, 60, 1e-5), (0.2, 0.7, 300, 1e-5),
    (0.1, 1.0, 100, 1e-5), (0.1, 0.5, 50, 1e-6), (0.1, 3.0, 1000, 1e-5), (0.05, 1.3, 500, 1e-5),
    (0.01, 1.0, 1000, 1e-5), (0.01, 0.6, 10000, 1e-6), (0.01, 4.0, 2000, 1e-5),
    (0.001, 1.1, 10000, 1e-5), (0.001, 0.8, 100000, 1e-7), (0.3, 10.0, 200, 1e-5),
    (0.02, 2.0, 5, 1e-4), (0.7, 1.2, 40, 1e-5), (0.004, 1.05, 4000, 1e-6), (0.25, 0.9, 1, 1e-5),
]
FIXED = [  # (n, m, z, rounds, delta)
    (100, 10, 1.0, 100, 1e-5), (100, 20, 1.5, 200, 1e-5), (1000, 10, 1.1, 1000, 1e-5),
    (50, 5, 2.0, 60, 1e-5), (10, 2, 1.0, 30, 1e-3), (500, 50, 0.8, 100, 1e-6),
    (200, 1, 0.9, 500, 1e-5), (1000, 100, 3.0, 300, 1e-5),
]


def main():
    ensure_venv(["opacus", "dp-accounting"], "import opacus, dp_accounting")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import RDPAccountant

    import logging

    class Warned(logging.Handler):  # dp_accounting logs an order it had to leave out
        count = 0

        def emit(self, record):
            Warned.count += record.levelno >= logging.WARNING

    logging.getLogger().addHandler(Warned())
    NR = dp_accounting.NeighboringRelation
    cases = []
    for q, z, t, d in POISSON:
        g = RdpAccountant(neighboring_relation=NR.ADD_OR_REMOVE_ONE)
        Warned.count = 0
        g.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t)
        eps = float(g.get_epsilon(d))
        o = RDPAccountant()
        o.history = [(z, q, t)]
        cases.append({"sampling": "poisson", "q": q, "noise_multiplier": z, "rounds": t,
                      "delta": d, "dp_accounting": eps, "opacus": float(o.get_epsilon(d)),
                      "dp_accounting_orders_dropped": Warned.count})
    for n, m, z, t, d in FIXED:
        g = RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
        g.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            n, m, dp_accounting.GaussianDpEvent(z)), t)
        cases.append({"sampling": "fixed", "q": m / n, "noise_multiplier": z, "rounds": t,
                      "delta": d, "dp_accounting": float(g.get_epsilon(d)), "opacus": None,
                      "dp_accounting_orders_dropped": 0})
    doc = {
        "made_by": "bench/make_dp_fixture.py",
        "versions": {"opacus": __import__("opacus").__version__,
                     "dp_accounting": __import__("importlib.metadata").metadata.version("dp-accounting")},
        "opacus_orders": [float(a) for a in RDPAccountant.DEFAULT_ALPHAS],
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    for c in cases:
        print(c)
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    sys.exit(main())
