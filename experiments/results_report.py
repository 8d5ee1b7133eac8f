"""RESULTS.md, generated from the committed records ``results/*/results.jsonl``.

  python -m experiments.results_report            # rewrites RESULTS.md
  python -m experiments.results_report --check    # exit 1 if RESULTS.md is stale

Every table cell and every number in the prose is computed here from the records (mean ±
sample std over seeds, n, 95% intervals and Welch tests from
:mod:`experiments.results_stats`); the text around them only says what was run and which
table a claim rests on. ``tests/test_results_md.py`` regenerates the file and fails when it
differs, so an edited number or a new record without a regenerated report cannot slip in.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.results_stats import (
    compare,
    fmt_cell,
    fmt_compare,
    fmt_published,
    significant,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]

# sparse_learning's published LeNet-300-100 MNIST table (../shared/REFERENCES.md).
PUBLISHED_SL = {
    "dense": {0.0: 98.69},
    "snfs": {0.9: 98.67, 0.95: 98.53, 0.98: 98.20, 0.99: 97.53},
    "set": {0.9: 98.39, 0.95: 98.14, 0.98: 97.74, 0.99: 95.80},
}
NAMES = {
    "dense": "dense", "static": "static", "set": "SET", "rigl": "RigL", "snfs": "SNFS",
    "srigl": "SRigL", "srigl_no_ablation": "constant fan-in, no ablation",
}


# ----------------------------------------------------------------------------- records


def load(root: Path, name: str) -> list[dict]:
    """The records of ``results/<name>/results.jsonl`` (sweep ``final`` events and
    State-of-Sparsity rows); empty when the file does not exist."""
    path = root / "results" / name / "results.jsonl"
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON record ({e})") from e
        if r.get("event", "final") == "final":
            out.append(r)
    return out


def config_of(r: dict) -> dict:
    return json.loads(r["config"]) if isinstance(r.get("config"), str) else {}


def gamma_sal(r: dict) -> float:
    return float(config_of(r).get("algorithm_kwargs", {}).get("gamma_sal", 0.3))


def target(r: dict) -> float:
    return round(float(r.get("sparsity_target", r.get("target_sparsity", 0.0))), 4)


def values(records, pred: Callable[[dict], bool], key: str = "test_accuracy") -> list[float]:
    return [float(r[key]) for r in records if pred(r) and r.get(key) is not None]


def algo(name: str, sparsity: float | None = None,
         gamma: float | None = None) -> Callable[[dict], bool]:
    """Predicate: sweep records of algorithm ``name`` (at ``sparsity``; dense ignores it;
    with SRigL's ``gamma_sal`` equal to ``gamma`` when given)."""

    def pred(r):
        if r.get("algorithm") != name:
            return False
        if sparsity is not None and name != "dense" and target(r) != round(sparsity, 4):
            return False
        return gamma is None or gamma_sal(r) == gamma

    return pred


def sos(method: str, sparsity: float, **fields) -> Callable[[dict], bool]:
    """Predicate: State-of-Sparsity records of ``method`` at target ``sparsity``."""

    def pred(r):
        return (r.get("method") == method and target(r) == round(sparsity, 4)
                and all(r.get(k) == v for k, v in fields.items()))

    return pred


def table(rows: Sequence[tuple[str, Sequence[list[float]]]], cols: Sequence[str],
          n_expected: int = 3, head: str = "method", scale: float = 100.0) -> str:
    """Markdown table; each cell a list of values (empty: blank)."""
    lines = ["| " + " | ".join([head, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for label, cells in rows:
        text = [fmt_cell(v, scale, n_expected) if v else "" for v in cells]
        lines.append("| " + " | ".join([label, *text]) + " |")
    return "\n".join(lines)


def pct(s: float) -> str:
    return f"{100 * s:g}%"


def wall(records) -> str:
    w = [r["wall_time"] for r in records if r.get("wall_time") is not None]
    if not w:
        return ""
    q = sorted(w)
    med = q[len(q) // 2] if len(q) % 2 else 0.5 * (q[len(q) // 2 - 1] + q[len(q) // 2])
    return f"{len(records)} runs, {min(w):.0f}-{max(w):.0f} s each (median {med:.0f} s)"


def ordering_report(records, methods: Sequence[str], sparsities: Sequence[float]) -> str:
    """Where ``methods[0] > methods[1] > ...`` holds in the means, and which adjacent gaps a
    Welch test at 5% separates."""
    held, failed, sig = [], [], []
    for s in sparsities:
        vals = [values(records, algo(m, s)) for m in methods]
        if not all(vals):
            continue
        means = [summarize(v).mean for v in vals]
        ok = all(a >= b for a, b in zip(means, means[1:], strict=False))
        (held if ok else failed).append(pct(s))
        for m1, m2, v1, v2 in zip(methods, methods[1:], vals, vals[1:], strict=False):
            if significant(v1, v2):
                sig.append(f"{NAMES.get(m1, m1)} vs {NAMES.get(m2, m2)} at {pct(s)}")
    order = " >= ".join(NAMES.get(m, m) for m in methods)
    out = f"the mean ordering {order} holds at {', '.join(held) or 'no sparsity'}"
    if failed:
        out += f" and fails at {', '.join(failed)}"
    out += ("; Welch tests at 5% separate " + "; ".join(sig)) if sig else (
        "; no adjacent pair is separated by a Welch test at 5%")
    return out


# ----------------------------------------------------------------------------- sections


HEADER = """# Results

*Generated by `python -m experiments.results_report` from `results/*/results.jsonl`; do not
edit by hand (`tests/test_results_md.py` fails when this file differs from the records).*

Conventions: test accuracy in %, **mean ± sample std (ddof=1) over seeds**, n = 3 seeds per
cell unless a cell says `(n=k)`. A claim that compares two methods quotes the difference of
means, its 95% confidence interval and the two-sided p-value of Welch's t-test; with n = 3
per arm only large effects reach p < 0.05, so "not separated" means "not shown", not
"equal". A published number is compared with the 95% t-interval of our mean. Machine: the
project's shared 2-core x86-64 CPU, jax 0.10.2, with other jobs running (wall times are
upper bounds). No GPU number appears here.

**Which split chose what.** Only the sparse_learning replica below was run with a
validation split (54k/6k; `validation_size` in every config now). In every older record
there was none: the VD/L0 penalty weights, SRigL's `gamma_sal` = 0.95 and `sparse_init`
were adopted after looking at **test** accuracy, so those rows are optimistic and the text
says so where it matters. No hyperparameter of the replica
was chosen at all: it is the published protocol, run once per seed; its validation accuracy
is reported next to the test accuracy.
"""


def section_replica(root: Path) -> str:
    recs = load(root, "sl_replica")
    sparsities = (0.9, 0.95, 0.98, 0.99)
    out = ["## MNIST LeNet-300-100 under sparse_learning's own protocol (the faithful replica)",
           "",
           "`experiments/configs/mnist_lenet300_sparse_learning.py`: 54k/6k train/validation "
           "split, uniform per-layer density, topology update once per epoch (540 steps), prune "
           "rate 0.5 cosine-decayed over the whole run (SET and SNFS alike), SGD with Nesterov "
           "momentum 0.9, lr 0.1 x0.1 at 25k and 50k iterations, L2 5e-4, batch 100, 100 "
           "epochs (54,000 steps). This is the protocol behind the published table "
           "(../shared/REFERENCES.md).",
           "",
           "`python -m experiments.sweep --config experiments/configs/mnist_lenet300_sparse_learning.py "
           "--out runs/sl_replica --methods snfs,set --sparsities 0.99 --seeds 0,1,2 --set "
           "data_dir=../shared/data/mnist --set checkpoint_every=5400` (then `--methods set "
           "--sparsities 0.98`, `--methods static --sparsities 0.99` and `--methods snfs "
           "--sparsities 0.98`)",
           ""]
    if not recs:
        out.append("No records yet (`results/sl_replica/results.jsonl` absent).")
        return "\n".join(out)
    cols = [s for s in sparsities if any(target(r) == s for r in recs)]
    methods = [m for m in ("dense", "static", "set", "snfs") if any(r["algorithm"] == m
                                                                    for r in recs)]
    lines = ["| method | split | " + " | ".join(pct(s) for s in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for m in methods:
        for split, key in (("test", "test_accuracy"), ("validation", "val_accuracy")):
            cells = []
            for s in cols:
                v = values(recs, algo(m, s), key)
                cells.append(fmt_cell(v, 100, 3) if v else "")
            lines.append(f"| {NAMES[m]} | {split} | " + " | ".join(cells) + " |")
        pub = PUBLISHED_SL.get(m, {})
        if pub:
            cells = [f"{pub[s]:.2f}" if s in pub else "" for s in cols]
            lines.append(f"| {NAMES[m]} | published (test) | " + " | ".join(cells) + " |")
    out += lines
    out += ["", wall(recs) + ".", ""]
    claims = []
    for m in ("set", "snfs"):
        for s in cols:
            v = values(recs, algo(m, s))
            if v and s in PUBLISHED_SL[m]:
                claims.append(f"{NAMES[m]} {pct(s)}: {fmt_published(v, PUBLISHED_SL[m][s])}")
    if claims:
        out.append("Published means against the 95% interval of ours (test split): "
                   + "; ".join(claims) + ".")
    pairs = []
    for s in cols:
        a, b, c = (values(recs, algo(m, s)) for m in ("snfs", "set", "static"))
        if a and b:
            pairs.append(f"SNFS - SET at {pct(s)}: {fmt_compare(a, b)}")
        if b and c:
            pairs.append(f"SET - static at {pct(s)}: {fmt_compare(b, c)}")
    if pairs:
        out += ["", "Comparisons within the replica (same table): " + "; ".join(pairs) + "."]
    kept = _uniform_output_weights(recs[0], cols)
    out += ["", "Uniform density also thins the 100x10 output layer: it keeps "
            + ", ".join(f"{n} weights at {pct(s)}" for s, n in kept.items())
            + ". SNFS moves budget between layers by momentum; SET (no redistribution) "
            "cannot, which is one candidate cause of a SET shortfall at 99%; it was not "
            "isolated here."]
    missing = [f"{NAMES[m]} {pct(s)}" for m in ("static", "set", "snfs") for s in sparsities
               if not values(recs, algo(m, s))]
    if missing or not values(recs, algo("dense")):
        out += ["", "**Not run** under this protocol (time: " + wall(recs)
                + " on this shared CPU): " + ", ".join(
                    (["dense"] if not values(recs, algo("dense")) else []) + missing) + "."]
    return "\n".join(out)


def _uniform_output_weights(r: dict, sparsities) -> dict[float, int]:
    """Weights the uniform distribution keeps in the last layer of ``r``'s model."""
    from experiments import models, plots

    cfg = models.model_config(r["model"])
    model_cfg = json.loads(r["model_config"]) if r.get("model_config") else {}
    if "hidden" in model_cfg:
        cfg.hidden = tuple(model_cfg["hidden"])
    fan = _fan_ins(cfg, r["image_shape"])
    last = sorted(fan)[-1]
    out = {}
    for s in sparsities:
        per = plots.layer_sparsities(cfg, tuple(r["image_shape"]), s, "uniform")
        out[s] = int(round((1 - per[last]) * fan[last] * 10))
    return out


def section_mnist20(root: Path) -> str:
    recs = load(root, "mnist_lenet300")
    sp = (0.9, 0.95, 0.98, 0.99)
    snfs_drop = sorted({config_of(r).get("drop_fraction") for r in recs
                        if r["algorithm"] == "snfs"})
    rows = [(NAMES[m], [values(recs, algo(m, s)) for s in sp])
            for m in ("static", "set", "rigl", "snfs")]
    dense = values(recs, algo("dense"))
    out = ["## MNIST LeNet-300-100, 20 epochs, ERK (not the published protocol)", "",
           "`python -m experiments.sweep --config experiments/configs/mnist_lenet300.py --out "
           "runs/mnist_lenet300 --methods dense,static,set,rigl,snfs --sparsities "
           "0.9,0.95,0.98,0.99 --seeds 0,1,2 --set epochs=20 --set batch_size=100 --set "
           "learning_rate=0.1 --set weight_decay=0.0001 --set data_dir=../shared/data/mnist "
           "--set checkpoint_every=0`", "",
           "SGD momentum 0.9, lr 0.1 cosine, batch 100, L2 1e-4, 20 epochs on all 60k training "
           "images (no validation split), ERK, topology updates every 100 steps until 75% of "
           "training. **Drop fraction: the records' configs say "
           f"{', '.join(str(d) for d in snfs_drop)} for SNFS too** (the harness then passed "
           "the config's value and overrode SNFS's own 0.5; fixed: a config's `drop_fraction` "
           "is now `None` unless set, and `jaxsparse.snfs`'s default applies).", "",
           f"Dense: {fmt_cell(dense, 100, 3)}.", "",
           table(rows, [pct(s) for s in sp]), "", wall(recs) + ".", "",
           "* Table above: " + ordering_report(recs, ["rigl", "set", "static"], sp) + ".",
           "* DST vs static at 99%: SET - static "
           + fmt_compare(values(recs, algo("set", 0.99)), values(recs, algo("static", 0.99)))
           + "; SNFS - SET " + fmt_compare(values(recs, algo("snfs", 0.99)),
                                          values(recs, algo("set", 0.99))) + "."]
    return "\n".join(out)


def section_rigl_recipe(root: Path) -> str:
    recs = load(root, "mnist_lenet300_published")
    sp = (0.9, 0.95, 0.98, 0.99)
    rows = [(NAMES[m], [values(recs, algo(m, s)) for s in sp]) for m in ("rigl", "snfs")]
    snfs_drop = sorted({config_of(r).get("drop_fraction") for r in recs
                        if r["algorithm"] == "snfs"})
    out = ["## MNIST LeNet-300-100, rigl's MNIST recipe (a different protocol from the "
           "published table)", "",
           "`python -m experiments.sweep --config experiments/configs/mnist_lenet300_published.py "
           "--out runs/mnist_lenet300_published --methods dense,rigl,snfs --sparsities "
           "0.9,0.95,0.98,0.99 --seeds 0,1,2 --set data_dir=../shared/data/mnist` (run before the "
           "config gained its validation split: these records train on all 60k images)", "",
           "rigl's MNIST setup: batch 100, SGD Nesterov 0.9, lr 0.2 /3 at epochs 75 and 95, L2 "
           "1e-4, 100 epochs, **ERK**, updates every 100 steps until 75% of training, SNFS drop "
           f"fraction {', '.join(str(d) for d in snfs_drop)} (the bug above). The published "
           "sparse_learning table was produced by another protocol (the replica section), so "
           "these rows are not a replication of it.", "",
           f"Dense: {fmt_cell(values(recs, algo('dense')), 100, 3)}.", "",
           table(rows, [pct(s) for s in sp]), "", wall(recs) + ".", "",
           "* SNFS - RigL, same table: " + "; ".join(
               f"{pct(s)} {fmt_compare(values(recs, algo('snfs', s)), values(recs, algo('rigl', s)))}"
               for s in sp) + ".", "",
           "![MNIST frontier, rigl recipe](results/mnist_lenet300_published/frontier.png)"]
    return "\n".join(out)


def section_lenet5(root: Path) -> str:
    recs = load(root, "fmnist_lenet5")
    si = load(root, "fmnist_lenet5_sparse_init")
    sp = (0.8, 0.9, 0.95, 0.98)
    rows = [(NAMES[m], [values(recs, algo(m, s)) for s in sp]) for m in ("static", "set", "rigl")]
    sp_si = (0.8, 0.9, 0.95, 0.98, 0.99)
    rows_si = [("RigL, masked dense init", [values(recs, algo("rigl", s)) for s in sp_si]),
               ("RigL, `sparse_init`", [values(si, algo("rigl", s)) for s in sp_si])]
    at98 = [(NAMES[m], [values(si, algo(m, 0.98)), values(recs, algo(m, 0.98))])
            for m in ("static", "set", "rigl")]
    fail = {m: sum(v < 0.5 for v in values(recs, algo(m, 0.98))) for m in ("static", "set",
                                                                         "rigl")}
    out = ["## Fashion-MNIST LeNet-5: dense, static, SET, RigL, 5 epochs", "",
           "`python -m experiments.sweep --config experiments/configs/fashion_lenet5.py --out "
           "runs/fmnist_lenet5 --methods dense,static,set,rigl --sparsities 0.8,0.9,0.95,0.98 "
           "--seeds 0,1,2 --set epochs=5 --set data_dir=../shared/data/fashion_mnist --set "
           "checkpoint_every=0`", "",
           "LeNet-5 (conv 6 / conv 16 / 120 / 84 / 10, ReLU, average pooling), SGD momentum 0.9, "
           "lr 0.05 cosine, batch 128, 5 epochs, ERK, no validation split. Table L5:", "",
           f"Dense: {fmt_cell(values(recs, algo('dense')), 100, 3)}.", "",
           table(rows, [pct(s) for s in sp]), "", wall(recs) + ".", "",
           "* Table L5: " + ordering_report(recs, ["rigl", "set", "static"], sp) + ".",
           "* At 98%, runs ending below 50% (failed to train) out of 3: "
           + ", ".join(f"{NAMES[m]} {k}" for m, k in fail.items()) + ".", "",
           "**`sparse_init`** (`jaxsparse.sparse_init`: each neuron's initial active weights "
           "rescaled by sqrt(fan-in / active fan-in); `--set sparse_init=true`; adopted after "
           "looking at test accuracy). Table L5-init, same recipe:", "",
           table(rows_si, [pct(s) for s in sp_si], head="RigL on LeNet-5"), "",
           "At 98%, `sparse_init` vs masked dense init (table L5-init and L5):", "",
           table(at98, ["`sparse_init`", "masked dense init"]), "",
           "* RigL at 98%, `sparse_init` - masked init: "
           + fmt_compare(values(si, algo("rigl", 0.98)), values(recs, algo("rigl", 0.98)))
           + "; with `sparse_init`, " + ordering_report(si, ["rigl", "set", "static"], [0.98])
           + ". (No masked-init RigL run exists at 99%.)"]
    return "\n".join(out)


def _k0(model: str, hidden, image_shape, sparsity: float) -> dict[str, int]:
    """ERK fan-in per sparse layer: ``round(density * fan_in)`` (what SRigL's k0 is)."""
    from experiments import models, plots

    cfg = models.model_config(model)
    if hidden is not None:
        cfg.hidden = tuple(hidden)
    per = plots.layer_sparsities(cfg, tuple(image_shape), sparsity, "erk")
    fan_in = _fan_ins(cfg, image_shape)
    return {k: int(round((1 - per[k]) * fan_in[k])) for k in per}


def _fan_ins(cfg, image_shape) -> dict[str, int]:
    import jax

    from experiments import models

    model = models.create_model(cfg, 10)
    params = jax.eval_shape(lambda k: models.init_params(model, tuple(image_shape), k),
                            jax.random.key(0))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith("kernel"):
            out[name] = int(math.prod(leaf.shape[:-1]))
    return out


def section_srigl(root: Path) -> str:
    out = ["## Structured DST: RigL vs SRigL (with / without ablation), LeNet-300-100, 10 "
           "epochs", "",
           "`python -m experiments.sweep --config experiments/configs/mnist_lenet300.py --out "
           "runs/mnist_mlp_srigl --methods srigl,srigl_no_ablation,rigl --sparsities "
           "0.8,0.9,0.95,0.99 --seeds 0,1,2 --set epochs=10 --set batch_size=100 --set "
           "learning_rate=0.1 --set weight_decay=0.0001 --set data_dir=../shared/data/mnist "
           "--set checkpoint_every=0` (Fashion-MNIST: `--set dataset=fashion_mnist --set "
           "data_dir=../shared/data/fashion_mnist`; gamma_sal 0.95: `--methods srigl "
           "--sparsities 0.95,0.99 --set 'algorithm_kwargs={\"gamma_sal\": 0.95}'`). ERK, no "
           "validation split; gamma_sal 0.95 was tried after the 0.3 runs, on test accuracy.",
           ""]
    sp = (0.8, 0.9, 0.95, 0.99)
    for ds, label in (("mnist", "MNIST"), ("fmnist", "Fashion-MNIST")):
        recs = load(root, f"{ds}_mlp_srigl") + load(root, f"{ds}_mlp_srigl_g095")
        rows = [("RigL", [values(recs, algo("rigl", s)) for s in sp]),
                ("SRigL, gamma_sal 0.3", [values(recs, algo("srigl", s, gamma=0.3))
                                          for s in sp]),
                ("SRigL, gamma_sal 0.95", [values(recs, algo("srigl", s, gamma=0.95))
                                           for s in sp]),
                ("constant fan-in, no ablation", [values(recs, algo("srigl_no_ablation", s))
                                                  for s in sp])]
        rigl99 = values(recs, algo("rigl", 0.99))
        s03 = values(recs, algo("srigl", 0.99, gamma=0.3))
        s95 = values(recs, algo("srigl", 0.99, gamma=0.95))
        noab = values(recs, algo("srigl_no_ablation", 0.99))
        out += [f"**{label}** (table S-{ds}):", "", table(rows, [pct(s) for s in sp]), "",
                f"* 99%, table S-{ds}: SRigL (gamma_sal 0.95) - RigL {fmt_compare(s95, rigl99)}; "
                f"SRigL (0.3) - RigL {fmt_compare(s03, rigl99)}; no ablation - RigL "
                f"{fmt_compare(noab, rigl99)}; ablation effect, SRigL (0.95) - no ablation "
                f"{fmt_compare(s95, noab)}.", ""]
        neurons = _neurons(recs)
        if neurons:
            out += [f"Active neurons at the end (mean over seeds; table N-{ds}):", "", neurons,
                    ""]
    mn = load(root, "mnist_mlp_srigl")
    shape = mn[0]["image_shape"] if mn else (28, 28, 1)
    k0 = _k0("lenet300", (300, 100), shape, 0.99)
    out += ["* SRigL's ablation threshold at 99% (ERK): k0 = "
            + ", ".join(f"{k.split('/')[0]} {v}" for k, v in k0.items())
            + " inputs per neuron, so tau = max(1, floor(gamma_sal k0)) = "
            + ", ".join(f"{k.split('/')[0]} {max(1, math.floor(0.3 * v))}"
                        for k, v in k0.items())
            + " at gamma_sal 0.3 and "
            + ", ".join(f"{k.split('/')[0]} {max(1, math.floor(0.95 * v))}"
                        for k, v in k0.items()) + " at 0.95.",
            "* The paper's claim (SRigL with ablation ~= RigL at high sparsity), tables S-mnist "
            "and S-fmnist at 99%: " + _srigl_verdict(root) + " The neuron counts are from "
            "these 10-epoch runs only; blank cells are layers that ERK keeps dense at that "
            "sparsity (no mask, all neurons active)."]
    out += ["", _section_srigl_cnn(root)]
    return "\n".join(out)


def _srigl_verdict(root: Path) -> str:
    parts = []
    for ds, label in (("mnist", "MNIST"), ("fmnist", "Fashion-MNIST")):
        recs = load(root, f"{ds}_mlp_srigl") + load(root, f"{ds}_mlp_srigl_g095")
        best = max((0.3, 0.95), key=lambda g: summarize(
            values(recs, algo("srigl", 0.99, gamma=g)) or [0.0]).mean)
        c = compare([100 * v for v in values(recs, algo("srigl", 0.99, gamma=best))],
                    [100 * v for v in values(recs, algo("rigl", 0.99))])
        verdict = ("**not reproduced**" if c.hi < 0 else
                   "not contradicted (the interval includes zero)")
        parts.append(f"{label}, best gamma_sal {best:g} (chosen on test): SRigL - RigL "
                     f"{c.diff:+.2f} points, 95% CI {c.lo:+.2f} to {c.hi:+.2f}: {verdict}")
    return "; ".join(parts) + "."


def _neurons(recs) -> str:
    layers = sorted({k.split("/", 1)[1] for r in recs for k in r
                     if k.startswith("active_neurons/")})
    if not layers:
        return ""
    groups = collections.defaultdict(list)
    for r in recs:
        label = NAMES.get(r["algorithm"], r["algorithm"])
        if r["algorithm"] == "srigl":
            label += f", gamma_sal {gamma_sal(r):g}"
        groups[(label, target(r))].append(r)
    lines = ["| method | sparsity | " + " | ".join(lay.split("/")[0] for lay in layers) + " |",
             "|" + "---|" * (len(layers) + 2)]
    for (label, s), rs in sorted(groups.items()):
        cells = []
        for lay in layers:
            v = [r[f"active_neurons/{lay}"] for r in rs if f"active_neurons/{lay}" in r]
            cells.append(f"{sum(v) / len(v):.1f}" if v else "")
        lines.append(f"| {label} | {pct(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _section_srigl_cnn(root: Path) -> str:
    recs = load(root, "fmnist_lenet5_sparse_init")
    sp = (0.8, 0.9, 0.95, 0.99)
    rows = [(NAMES[m], [values(recs, algo(m, s)) for s in sp])
            for m in ("rigl", "srigl", "srigl_no_ablation")]
    r99, s99, n99 = (values(recs, algo(m, 0.99)) for m in ("rigl", "srigl", "srigl_no_ablation"))
    return "\n".join([
        "**Fashion-MNIST LeNet-5, gamma_sal 0.3, `sparse_init`, 5 epochs** (table S-cnn; "
        "`python -m experiments.sweep --config experiments/configs/fashion_lenet5.py --out "
        "runs/fmnist_lenet5_sparse_init --methods rigl,srigl,srigl_no_ablation --sparsities "
        "0.8,0.9,0.95,0.99 --seeds 0,1,2 --set epochs=5 --set "
        "data_dir=../shared/data/fashion_mnist --set checkpoint_every=0 --set "
        "sparse_init=true`):", "",
        table(rows, [pct(s) for s in sp]), "",
        f"* 99%, table S-cnn: SRigL - RigL {fmt_compare(s99, r99)}; SRigL - no ablation "
        f"{fmt_compare(s99, n99)}.", "",
        "Active neurons at the end (table N-cnn; blank: a layer ERK keeps dense there):", "",
        _neurons(recs)])


def dedupe(recs, fields: Sequence[str]) -> list[dict]:
    """One record per value of ``fields`` (the last one loaded wins): two sweeps that ran the
    same cell with the same seed must not count as two samples."""
    return list({tuple(r.get(f) for f in fields): r for r in recs}.values())


def _best_weight(recs, method: str, s: float, ranking: str | None = None):
    """``(weight, test accuracies, achieved sparsities)`` of the penalty weight with the best
    mean test accuracy."""
    by_w = collections.defaultdict(list)
    for r in recs:
        if r.get("method") == method and target(r) == round(s, 4) and (
                ranking is None or r.get("ranking") == ranking):
            by_w[r.get("penalty_weight")].append(r)
    if not by_w:
        return None, [], []
    w = max(by_w, key=lambda k: (summarize([r["test_accuracy"] for r in by_w[k]]).mean, k))
    rs = by_w[w]
    return w, [r["test_accuracy"] for r in rs], [r["sparsity"] for r in rs]


def section_sos(root: Path) -> str:
    recs = dedupe(load(root, "sos_pruning") + load(root, "sos_pruning_hi")
                  + load(root, "sos_pruning_global") + load(root, "sos_tuned"),
                  ("method", "target_sparsity", "ranking", "penalty_weight", "seed"))
    sp = (0.5, 0.8, 0.9, 0.95, 0.98)
    mag_l = [values(recs, sos("magnitude", s, ranking="layerwise")) for s in sp]
    mag_g = [values(recs, sos("magnitude", s, ranking="global")) for s in sp]
    rnd_l = [values(recs, sos("random", s, ranking="layerwise")) for s in sp]
    rnd_g = [values(recs, sos("random", s, ranking="global")) for s in sp]
    best = {m: [_best_weight(recs, m, s) for s in sp] for m in ("vd", "l0", "vd_ft", "l0_ft")}

    def cells(m):
        out = []
        for s, (w, v, achieved) in zip(sp, best[m], strict=True):
            if not v:
                out.append("")
                continue
            cell = f"{fmt_cell(v, 100, 3)} (w={w:g}"
            mean_ach = sum(achieved) / len(achieved)
            if mean_ach > s + 0.005:
                cell += f", at {mean_ach:.3f}"
            out.append(cell + ")")
        return out

    lines = ["| method | steps | " + " | ".join(pct(s) for s in sp) + " |",
             "|" + "---|" * (len(sp) + 2)]
    for label, steps, vals in (("magnitude, layerwise", "T", mag_l),
                               ("magnitude, global", "T", mag_g),
                               ("random, layerwise", "T", rnd_l),
                               ("random, global", "T", rnd_g)):
        lines.append(f"| {label} | {steps} | "
                     + " | ".join(fmt_cell(v, 100, 3) if v else "" for v in vals) + " |")
    for label, steps, m in (("VD, global cut", "T", "vd"), ("L0, global cut", "T", "l0"),
                            ("VD, cut + fine-tune", "1.3T", "vd_ft"),
                            ("L0, cut + fine-tune", "1.3T", "l0_ft")):
        lines.append(f"| {label} | {steps} | " + " | ".join(cells(m)) + " |")

    claims, ahead, separated = [], [], []
    for i, s in enumerate(sp):
        g = mag_g[i]
        for m, label in (("vd", "VD cut"), ("l0", "L0 cut")):
            _, v, _ = best[m][i]
            if g and v:
                claims.append(f"{pct(s)} global magnitude - {label} {fmt_compare(g, v)}")
                c = compare(g, v)
                ahead.append(c.diff > 0)
                if c.lo > 0:
                    separated.append(f"{label} at {pct(s)}")
    floor_fails = []
    for i, s in enumerate(sp):
        others = {"magnitude": mag_l[i], "VD cut": best["vd"][i][1], "L0 cut": best["l0"][i][1]}
        for name, v in others.items():
            if v and rnd_l[i] and summarize(rnd_l[i]).mean > summarize(v).mean:
                floor_fails.append(f"{pct(s)} (random {fmt_cell(rnd_l[i], 100, 3)} > {name} "
                                   f"{fmt_cell(v, 100, 3)})")
    return "\n".join([
        "## Dense-to-sparse, the State of Sparsity comparison (Fashion-MNIST, LeNet-300-100)",
        "",
        "`python -m experiments.state_of_sparsity --study pruning --sparsities ... --seeds "
        "0,1,2 --epochs 5 --out runs/sos_pruning` (+ `--ranking global` for the global rows; "
        "tuned VD/L0: `--methods vd,l0 --sparsities 0.8,0.9,0.95,0.98 --vd_weight 1,3,10 "
        "--l0_weight 1,10,50 --finetune_fraction 0.3 --out runs/sos_tuned`).", "",
        "Adam lr 1e-3 cosine, batch 128, 5 epochs (T = 2,340 steps), no validation split. "
        "Magnitude and random: gradual from 10% to 75% of training. VD and L0: trained with "
        "the penalty, then cut to the target by a *global* ranking; `+ fine-tune` trains the "
        "cut model 30% more steps (1.3T). **The VD/L0 cells show the penalty weight w with the "
        "best mean test accuracy** among those run (VD 1, 3, 10; L0 0.1, 1, 10, 50): chosen on "
        "the test set, so they are optimistic; `at` = achieved sparsity where the penalty alone "
        "pruned past the target. Where two sweeps ran the same cell and seed, the later "
        "record counts once. Table SoS:", "",
        "\n".join(lines), "",
        "* Same ranking scope (global) and the same step budget T, table SoS: "
        + "; ".join(claims) + f". Global magnitude is ahead in {sum(ahead)} of {len(ahead)} "
        f"comparisons, and the 95% interval excludes zero in {len(separated)} of them ("
        + ", ".join(separated) + "), although the VD/L0 penalties were chosen on the test set: "
        "at equal scope and budget the records support Gale et al. (magnitude pruning is as "
        "good or better), not the reverse. The fine-tuned VD/L0 rows train "
        "1.3x the steps and have no equal-budget magnitude row; they are not evidence against "
        "magnitude pruning.",
        "* \"Random pruning is the floor\" (table SoS, layerwise): "
        + ("false at " + "; ".join(floor_fails) if floor_fails else "holds at every sparsity")
        + ".",
        "* Not run: layerwise VD/L0 cuts, fine-tuning for magnitude/random, penalties chosen "
        "on a validation split (issue 14 item 2).", "",
        "![State of Sparsity frontier, Fashion-MNIST MLP](results/sos_tuned/frontier.png)"])


def section_sos_mnist(root: Path) -> str:
    recs = load(root, "sos_pruning_mnist")
    sp = (0.8, 0.9, 0.95, 0.98)
    rows = [(label, [values(recs, sos(m, s)) for s in sp]) for label, m in (
        ("magnitude, layerwise (T)", "magnitude"), ("random, layerwise (T)", "random"),
        ("VD w=1, global cut (T)", "vd"), ("VD w=1, cut + fine-tune (1.3T)", "vd_ft"),
        ("L0 w=10, global cut (T)", "l0"), ("L0 w=10, cut + fine-tune (1.3T)", "l0_ft"))]
    return "\n".join([
        "**MNIST, same MLP and protocol** (table SoS-mnist; one penalty weight each; `python -m "
        "experiments.state_of_sparsity --study pruning --dataset mnist --sparsities "
        "0.8,0.9,0.95,0.98 --seeds 0,1,2 --vd_weight 1 --l0_weight 10 --finetune_fraction 0.3 "
        "--out runs/sos_pruning_mnist`). No global magnitude row was run on MNIST, so this "
        "table compares different ranking scopes and budgets and supports no method ordering.",
        "", table(rows, [pct(s) for s in sp])])


def section_retrain(root: Path) -> str:
    recs = load(root, "sos_retrain")
    sp = (0.9, 0.98)
    methods = (("magnitude (joint)", "magnitude"), ("IMP, rewind 0", "lottery_rewind0"),
               ("IMP, rewind k", "lottery_rewind"), ("scratch-e", "scratch_e"),
               ("scratch-b", "scratch_b"))
    T = next((r["steps"] for r in recs), 0)
    budget = {}
    for label, m in methods:
        r = next((x for x in recs if x.get("method") == m), None)
        if r is None:
            continue
        if m.startswith("lottery"):
            budget[label] = (T + r["rounds"] * (T - r["rewind_step"])) / T
        elif m.startswith("scratch"):
            budget[label] = r["train_steps"] / T
        else:
            budget[label] = 1.0
    lines = ["| method | steps / T | " + " | ".join(pct(s) for s in sp) + " |",
             "|" + "---|" * (len(sp) + 2)]
    for label, m in methods:
        lines.append(f"| {label} | {budget.get(label, math.nan):.2f} | " + " | ".join(
            fmt_cell(values(recs, sos(m, s)), 100, 3) for s in sp) + " |")
    dense = values(recs, lambda r: r.get("method") == "dense")
    rew = [r["rewind_step"] for r in recs if r.get("method") == "lottery_rewind"]
    return "\n".join([
        "**Retraining from a learned mask** (table RT; `python -m experiments.state_of_sparsity "
        "--study retrain --sparsities 0.9,0.98 --seeds 0,1,2 --epochs 5 --out "
        "runs/sos_retrain`; per-layer masks; IMP: 3 rounds from the dense run, rewind k = "
        f"step {rew[0] if rew else '-'}; dense {fmt_cell(dense, 100, 3)}):", "",
        "\n".join(lines), "",
        "* IMP trains the dense run plus three retrainings: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in budget.items() if k.startswith("IMP"))
        + " the steps of the joint run, so table RT is not step-matched; no joint-pruning run "
        "with IMP's budget exists (issue 14 item 2, not run). At 98%: IMP rewind k - joint "
        + fmt_compare(values(recs, sos("lottery_rewind", 0.98)),
                      values(recs, sos("magnitude", 0.98)))
        + "; scratch-e - joint " + fmt_compare(values(recs, sos("scratch_e", 0.98)),
                                               values(recs, sos("magnitude", 0.98))) + "."])


def section_init(root: Path) -> str:
    recs = load(root, "sos_init")
    sp = (0.5, 0.8, 0.9, 0.95, 0.98)
    ms = (("SNIP", "snip"), ("GraSP", "grasp"), ("SynFlow", "synflow"), ("random", "random"))
    rows = [(label, [values(recs, sos(m, s)) for s in sp]) for label, m in ms]
    order = []
    for s in sp:
        means = sorted(((summarize(values(recs, sos(m, s))).mean, label) for label, m in ms),
                       reverse=True)
        order.append(f"{pct(s)} " + " > ".join(label for _, label in means))
    syn_snip = [f"{pct(s)} {fmt_compare(values(recs, sos('synflow', s)), values(recs, sos('snip', s)))}"
                for s in sp]
    return "\n".join([
        "**Pruning at initialization** (table PI; `python -m experiments.state_of_sparsity "
        "--study init --sparsities 0.5,0.8,0.9,0.95,0.98 --seeds 0,1,2 --epochs 5 --out "
        "runs/sos_init`; global ranking, then T steps with fixed masks):", "",
        table(rows, [pct(s) for s in sp]), "",
        "* Mean ordering, table PI: " + "; ".join(order) + ".",
        "* SynFlow - SNIP: " + "; ".join(syn_snip) + "."])


FOOTER = """## Not measured

* The rest of the sparse_learning replica grid (listed in its section), and its dense row.
* A State of Sparsity study with equal ranking scopes for every method, equal step budgets
  and validation-chosen penalties; a step-matched joint-pruning baseline for IMP.
* SRigL at 99% with gamma_sal chosen on a validation split, longer schedules, ViT-tiny.
* ERK vs uniform accuracy at equal parameter count.
* Any GPU number; CIFAR-10 (not obtainable here; its binary loader is tested on fabricated
  files).
"""


def render(root: Path = ROOT) -> str:
    """The whole RESULTS.md text for the records under ``root/results``."""
    parts = [HEADER, section_replica(root), section_mnist20(root), section_rigl_recipe(root),
             section_lenet5(root), section_srigl(root), section_sos(root),
             section_sos_mnist(root), section_retrain(root), section_init(root), FOOTER]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md is stale")
    p.add_argument("--out", default=str(ROOT / "RESULTS.md"))
    a = p.parse_args(argv)
    text = render(ROOT)
    out = Path(a.out)
    if a.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} differs from the records: run python -m experiments.results_report",
                  file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
