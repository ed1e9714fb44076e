"""The gate over a grid of update settings: where are D and kappa both clearly above zero?

D depends on the warm start only; kappa on the update (learning rate, lambda). For each (optim.lr, loss.nll_coef)
this runs `mel gate`'s measurement on the config's starting policy and records the report; it prints a table and
writes every report to docs/results/gate-sweep.json (with the command).

    .venv/bin/python experiments/gate_sweep.py --config configs/tiny-rules.yaml [--lr 1e-5,3e-5,1e-4]
        [--nll-coef 0.1,0.3,1] [--problems 20] [--kappa-steps 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mel_core import config as config_mod
from mel_core.step.runtime import clear_runtimes, get_runtime
from mel_core.study import gate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny-rules.yaml")
    ap.add_argument("--lr", default="1e-5,3e-5,1e-4")
    ap.add_argument("--nll-coef", default="0.1,0.3,1")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--kappa-steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/results/gate-sweep.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    settings = gate.GateSettings(max_problems=args.problems, kappa_steps=args.kappa_steps, resamples=2000)
    rows, reports = [], []
    for lr in [float(x) for x in args.lr.split(",")]:
        for coef in [float(x) for x in args.nll_coef.split(",")]:
            cfg = config_mod.load(args.config, [*args.overrides, f"optim.lr={lr}", f"loss.nll_coef={coef}"])
            rt = get_runtime(cfg)
            t0 = time.perf_counter()
            r = gate.run_gate(rt, rt.base_checkpoint, settings)
            r["setting"] = {"optim.lr": lr, "loss.nll_coef": coef, "seconds": time.perf_counter() - t0}
            reports.append(r)
            d, c = r["discovery"]["D"], r["coupling"]
            k, vs = c["kappa"], c["right_vs_rl_only"]
            rows.append(f"| {lr:g} | {coef:g} | {100 * d['rate']:.1f} [{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}] | "
                        f"{k['mean']:+.3f} [{k['ci_low']:+.3f}, {k['ci_high']:+.3f}] | "
                        f"{vs['mean']:+.3f} [{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}] | "
                        f"{c['decision_accuracy']['rl_only']:.3f} / {c['decision_accuracy']['right']:.3f} | "
                        f"{'yes' if r['verdict']['open'] else 'no'} |")
            print(rows[-1], flush=True)
            clear_runtimes()
    head = [("| optim.lr | loss.nll_coef | D (%) | kappa: right - mismatched (nats) | right - RL only (nats) | "
             "decision acc. RL only / right | D, kappa > 0 |"), "|---|---|---|---|---|---|---|"]
    print("\n".join(head + rows))
    command = shlex.join(["python", "experiments/gate_sweep.py", *sys.argv[1:]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "table": head + rows, "reports": reports}, indent=2,
                                         sort_keys=True))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
