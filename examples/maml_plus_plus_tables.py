"""The tables of docs/maml_plus_plus.md from `maml_plus_plus_omniglot.py --output` files.

    python examples/maml_plus_plus_tables.py runs    # runs/<way>way_seed<seed>[_<bn>].json

Per way, learner, BatchNorm setting and budget (equal meta-steps or equal
time): the mean over seeds of the 600-task accuracy, +- the mean of the
seeds' 95% intervals, and (the seeds' range). Files of one way must come
from the same settings but for the seed, the learners and the BatchNorm
setting (the script stops otherwise, rather than average different runs),
and name each learner, setting, budget and seed once.
"""
import collections
import glob
import json
import sys

import numpy as np

NAMES = {"maml": "MAML", "meta_sgd": "Meta-SGD", "maml_pp": "MAML++"}
# Flags that may differ between the files averaged into one table.
PER_FILE = {"seed", "learners", "transductive", "output", "data_dir"}
if len(sys.argv) != 2:
    sys.exit(f"usage: {sys.argv[0]} FOLDER_OF_RESULT_FILES")
omniglot = sorted(glob.glob(sys.argv[1] + "/*way_seed*.json"))
if not omniglot and not glob.glob(sys.argv[1] + "/sinusoid_seed*.json"):
    sys.exit(f"no <way>way_seed<seed>*.json or sinusoid_seed<seed>.json files in {sys.argv[1]!r}")
rows = collections.defaultdict(list)
settings, origin = {}, {}
for path in omniglot:
    data = json.load(open(path))
    way, seed = data["flags"]["n_way"], data["flags"]["seed"]
    shared = {k: v for k, v in data["flags"].items() if k not in PER_FILE}
    first = settings.setdefault(way, (path, shared))
    if first[1] != shared:
        differ = sorted(k for k in set(shared) | set(first[1]) if shared.get(k) != first[1].get(k))
        sys.exit(f"{path} and {first[0]} ({way}-way) differ in {', '.join(differ)}: "
                 "put runs of different settings in different folders")
    results = data["results"]
    for r in results:
        key = (way, r["learner"], r["transductive_batch_norm"], r["equal"])
        if (key, seed) in origin:
            sys.exit(f"{path} and {origin[key, seed]} both hold {key[1]} "
                     f"(transductive={key[2]}, equal {key[3]}) of {way}-way seed {seed}")
        origin[key, seed] = path
        # Files of runs whose equal-steps snapshot did not keep its own time
        # carry the whole run's there: leave it out.
        whole = [t for t in results if t["learner"] == r["learner"] and t["equal"] == "time"]
        r = dict(r, cpu=None if r["equal"] == "meta-steps" and whole
                 and whole[0]["train_cpu_seconds"] == r["train_cpu_seconds"] else r["train_cpu_seconds"])
        rows[key].append((seed, r))

def cpu(rs):
    known = [r["cpu"] for r in rs if r["cpu"] is not None]
    return f"{np.mean(known):.0f}" if known else "–"


def cell(values, intervals):
    v = 100 * np.array(values)
    return f"{v.mean():.1f} ± {100 * np.mean(intervals):.1f} ({v.min():.1f}–{v.max():.1f})"

for way in sorted({k[0] for k in rows}):
    print(f"\n### {way}-way 1-shot\n")
    print("| learner | BatchNorm in training | equal | seeds | meta-steps | train CPU s | learner, 1 step | learner, 10 steps | adapt(), 10 steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for transductive in (True, False):
        for equal in ("meta-steps", "time"):
            for learner in ("maml", "meta_sgd", "maml_pp"):
                got = rows.get((way, learner, transductive, equal))
                if not got:
                    continue
                rs = [r for _, r in got]
                steps = rs[0]["steps"]
                i1, i10 = steps.index(1), steps.index(max(steps))
                print(f"| {NAMES[learner]} | {'transductive' if transductive else 'support statistics'} | {equal} | "
                      f"{','.join(str(s) for s, _ in got)} | {np.mean([r['meta_steps'] for r in rs]):.0f} | "
                      f"{cpu(rs)} | "
                      f"{cell([r['learner_accuracy'][i1] for r in rs], [r['learner_interval'][i1] for r in rs])} | "
                      f"{cell([r['learner_accuracy'][i10] for r in rs], [r['learner_interval'][i10] for r in rs])} | "
                      f"{cell([r['adapt_accuracy'][i10] for r in rs], [r['adapt_interval'][i10] for r in rs])} |")

# Sinusoid: examples/meta_sgd_sinusoid.py --output runs/sinusoid_seed<seed>.json
sinusoid = collections.defaultdict(list)
for path in sorted(glob.glob(sys.argv[1] + "/sinusoid_seed*.json")):
    data = json.load(open(path))
    for name, r in data["results"].items():
        sinusoid[name].append((data["flags"]["seed"], r))
if sinusoid:
    print("\n### sinusoid, K = 10\n")
    print("| learner | seeds | meta-steps | train CPU s | query MSE before adaptation | after 1 step | "
          "after 10 steps |")
    print("|---|---|---|---|---|---|---|")
    for name in ("maml", "meta_sgd"):
        got = sinusoid.get(name, [])
        if not got:
            continue
        rs = [r for _, r in got]
        cells = []
        for i in range(len(rs[0]["steps"])):
            mse = np.array([r["mse"][i] for r in rs])
            if not np.all(np.isfinite(mse)):
                cells.append(f"diverges in {np.sum(~np.isfinite(mse))} of {len(mse)} seeds")
                continue
            cells.append(f"{mse.mean():.3f} ± {np.mean([r['interval'][i] for r in rs]):.3f} "
                         f"({mse.min():.3f}–{mse.max():.3f})")
        print(f"| {NAMES[name]} | {','.join(str(s) for s, _ in got)} | "
              f"{np.mean([r['meta_steps'] for r in rs]):.0f} | "
              f"{np.mean([r['train_cpu_seconds'] for r in rs]):.0f} | " + " | ".join(cells) + " |")
