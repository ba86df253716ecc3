"""Cut a trained run into per-domain modules by binary weight masks, and recompose them.

    python scripts/modules.py --ckpt RUN_DIR_OR_PARAMS --domains a,b,c \
        [--recompose a+b ...] --out DIR [--steps 300 --batch 8 --lr 0.1 \
         --size_weight 0.5 --share_weight 0.5 --embeddings --norms --seed 0]

Kingetsu, Kobayashi and Suzuki 2021 (arXiv 2112.13208); the method, its objective and the
straight-through masks are described in ``cpt_jax/modules.py``. With the weights frozen,
one mask per domain is learned jointly on the run's training rows of that domain; every
module (and every recomposition = union of modules) is then scored on the validation rows
of every domain of the run, the rows the run itself evaluated on.

--ckpt: a run's --workdir (its ``final_params``: train with --config.save_final_params=True)
or a params checkpoint inside a run's workdir (``WORKDIR/final_params``); the run's
``results.json`` says where its prepared data and tokenizer are.

Writes into --out (all at once; an interrupted run leaves nothing):
  modules.json     per domain: density, loss and full_loss on its own domain, losses on
                   every domain, densities per layer and per matrix kind; overlap (Jaccard)
                   between domains; per recomposition: density and losses on every domain;
                   the full model's losses and the settings; per earlier task, the
                   forgetting the run measured beside its module's overlap with the
                   later tasks' modules
  modules.png      densities per layer of each module, and the overlap heat map
  masks.npz        the 0/1 masks (key DOMAIN/PARAM_PATH)
  module_D/, recompose_A+B/   masked params checkpoints (removed weights set to 0), which
                   scripts/evaluate.py --ckpt (with --tokenizer, printed below) and its
                   --hf_export accept
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import types

import numpy as np

from cpt_jax import atomic, cli, results_file


def _fail(what: str) -> None:
    raise cli.UserError(what)


def resolve_ckpt(path: str) -> tuple[str, str]:
    """(params checkpoint dir, run workdir) from --ckpt."""
    from cpt_jax.train.checkpoint import CONFIG_FILE

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        _fail(f"--ckpt {path}: no such directory; give a run's --workdir or its final_params")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        ckpt, workdir = path, os.path.dirname(path)
    else:
        ckpt, workdir = os.path.join(path, "final_params"), path
        if not os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
            _fail(f"--ckpt {path}: neither a params checkpoint (no {CONFIG_FILE}) nor a run "
                  "with final_params; train with --config.save_final_params=True or give a "
                  "params checkpoint")
    if not os.path.isfile(results_file.path(workdir)):
        _fail(f"--ckpt {path}: {results_file.path(workdir)} not found, so the run's data is "
              "unknown; give a run's workdir (or its final_params) from scripts/train.py")
    return ckpt, workdir


def read_results(workdir: str, ckpt_arg: str) -> dict:
    """The run's results.json (``results_file.read``); a file that cannot be used is the
    one error line of ``--ckpt``."""
    try:
        return results_file.read(workdir, require=("config",))
    except results_file.ResultsError as e:
        _fail(f"--ckpt {ckpt_arg}: {e}")


def parse_lists(args, run_domains: list[str]) -> tuple[list[str], list[list[str]]]:
    domains = [d for d in args.domains.split(",") if d]
    unknown = [d for d in domains if d not in run_domains]
    if not domains or unknown or len(set(domains)) != len(domains):
        _fail(f"--domains {args.domains}: give distinct domains of the run, comma-separated, "
              f"from {run_domains} (e.g. --domains {','.join(run_domains)})")
    recs = []
    for spec in args.recompose:
        parts = spec.split("+")
        if len(parts) < 2 or any(p not in domains for p in parts) or len(set(parts)) != len(parts):
            _fail(f"--recompose {spec}: give 2 or more distinct --domains joined by '+', "
                  f"e.g. --recompose {'+'.join(domains[:2])}")
        recs.append(parts)
    return domains, recs


def load_run(workdir: str):
    """(run config, {domain: {"train", "val"}} prepared rows) of a finished run."""
    import ml_collections

    from cpt_jax.data import prepare as prepare_lib
    from cpt_jax.data import tokenizer as tokenizer_lib
    from cpt_jax.train.setup import load_tokenizer

    config = ml_collections.ConfigDict(results_file.read_config(workdir))
    domains = [dict(d) for d in config.data.domains]
    data_dir = os.path.expanduser(config.data.cache_dir or os.path.join(workdir, "data"))
    own = os.path.join(workdir, tokenizer_lib.RUN_TOKENIZER_DIR)  # the run's copy
    tok = (tokenizer_lib.load_tokenizer(own) if os.path.isdir(own)
           else load_tokenizer(config, domains, data_dir))
    prepared = prepare_lib.prepare_domains(domains, tok, data_dir, config.seq_len,
                                           config.data.val_fraction, config.data.split_seed,
                                           progress=False)
    return config, prepared, tok


def batch_sampler(prepared, domains, batch: int, mesh, seed: int):
    """sample(step) -> {domain: global batch of `batch` training rows drawn uniformly}."""
    from cpt_jax.data.loader import process_row_range, to_global

    lo, hi = process_row_range(mesh, batch)

    def sample(step):
        out = {}
        for k, d in enumerate(domains):
            rows = prepared[d]["train"]
            rng = np.random.default_rng([seed, step, k])
            tokens, segs = rows.read(rng.integers(0, len(rows), batch))
            out[d] = to_global(mesh, {"tokens": tokens[lo:hi], "segment_ids": segs[lo:hi]},
                               batch, lo)
        return out

    return sample


def forgetting_vs_overlap(results: dict, domains: list[str], overlap) -> list[dict]:
    """Per earlier task domain j (trained, then followed by other tasks): its forgetting
    f_j = R[T-1][j] - min_{j <= l < T-1} R[l][j] (Chaudhry et al. 2018, loss terms; the
    definition of cpt_jax.eval.metrics) beside the mean Jaccard overlap of its module with
    the modules of the domains trained after it: do domains that share more weights with
    what came later forget less, or more? Only domains given to --domains count."""
    R, tasks, cols = results["loss_matrix"], results["tasks"], results["domains"]
    out = []
    for i, d in enumerate(tasks[:-1]):
        later = [t for t in tasks[i + 1:] if t in domains and t != d]
        if d not in domains or d not in cols or not later or len(R) != len(tasks):
            continue
        j = cols.index(d)
        best = min(R[l][j] for l in range(i, len(tasks) - 1))
        out.append({"domain": d, "forgetting": R[-1][j] - best, "later": later,
                    "overlap_with_later": float(np.mean(
                        [overlap[domains.index(d)][domains.index(t)] for t in later]))})
    return out


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    from cpt_jax.eval.plots import save_figure

    domains = list(result["modules"])
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for d in domains:
        per = result["modules"][d]["layer_densities"]["all"]
        ax1.plot(range(len(per)), per, marker="o", label=d)
    ax1.set(xlabel="layer", ylabel="density (fraction of weights kept)",
            title="module density per layer", ylim=(0, 1))
    ax1.legend()
    ov = np.array(result["overlap"]["matrix"])
    im = ax2.imshow(ov, vmin=0, vmax=1, cmap="viridis")
    ax2.set_xticks(range(len(domains)), domains)
    ax2.set_yticks(range(len(domains)), domains)
    for i in range(len(domains)):
        for j in range(len(domains)):
            ax2.text(j, i, f"{ov[i, j]:.2f}", ha="center", va="center",
                     color="w" if ov[i, j] < 0.6 else "k")
    ax2.set_title("overlap (Jaccard) of masks")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    save_figure(fig, path)


def table(result: dict) -> str:
    domains = list(result["modules"])
    lines = [f"{'module':<16} {'density':>8} {'loss':>7} {'full':>7} "
             + " ".join(f"{'on ' + d:>10}" for d in result["full_losses"])]
    for name, m in result["modules"].items():
        lines.append(f"{name:<16} {m['density']:>8.3f} {m['loss']:>7.3f} {m['full_loss']:>7.3f} "
                     + " ".join(f"{m['losses'][d]:>10.3f}" for d in result["full_losses"]))
    for name, r in result["recompositions"].items():
        lines.append(f"{name:<16} {r['density']:>8.3f} {'':>7} {'':>7} "
                     + " ".join(f"{r['losses'][d]:>10.3f}" for d in result["full_losses"]))
    lines.append("overlap (Jaccard): " + "; ".join(
        f"{a}-{b} {result['overlap']['matrix'][i][j]:.3f}"
        for i, a in enumerate(domains) for j, b in enumerate(domains) if j > i))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="modules.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run workdir or params checkpoint in one")
    ap.add_argument("--domains", required=True, help="comma-separated domains of the run")
    ap.add_argument("--recompose", nargs="*", default=[], metavar="A+B",
                    help="recompositions (unions of modules) to score")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--steps", type=int, default=300, help="mask training steps")
    ap.add_argument("--batch", type=int, default=8, help="rows per domain per step")
    ap.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the logits")
    ap.add_argument("--init", type=float, default=2.0, help="initial mask logit (> 0: kept)")
    ap.add_argument("--size_weight", type=float, default=0.5, help="weight of mean density")
    ap.add_argument("--share_weight", type=float, default=0.5,
                    help="weight of the union's density (rewards shared weights)")
    ap.add_argument("--embeddings", action="store_true", help="also mask the embeddings")
    ap.add_argument("--norms", action="store_true", help="also mask the norm scales")
    ap.add_argument("--eval_rows", type=int, default=None,
                    help="validation rows per domain (default: the run's eval.max_rows)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the training batches and the mask noise")
    args = ap.parse_args(argv)
    for key in ("steps", "batch"):
        if getattr(args, key) < 1:
            _fail(f"--{key} {getattr(args, key)}: must be at least 1")
    if args.size_weight < 0 or args.share_weight < 0:
        _fail("--size_weight and --share_weight must be >= 0")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        _fail(f"--out {out} exists and is not empty; pass --overwrite or another --out")
    ckpt, workdir = resolve_ckpt(args.ckpt)
    run_results = read_results(workdir, args.ckpt)
    run_domains = [d["name"] for d in run_results["config"]["data"]["domains"]]
    domains, recs = parse_lists(args, run_domains)

    from cpt_jax import modules, sharding as sharding_lib
    from cpt_jax.data.loader import eval_batches
    from cpt_jax.train.checkpoint import load_config, load_params, save_params
    from cpt_jax.core.state import Placement, param_shardings
    from cpt_jax.train.step import make_eval_step

    t0 = time.perf_counter()
    config, prepared, tok = load_run(workdir)
    mcfg = load_config(ckpt)
    mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    p_shard = param_shardings(mcfg, mesh, rules)
    _, params = load_params(ckpt, p_shard, expected_config=mcfg)
    names = modules.maskable_names(params, args.embeddings, args.norms)
    eval_rows = args.eval_rows or config.eval.max_rows
    eval_sets = {d: eval_batches(prepared[d]["val"], eval_rows, config.eval.batch, mesh)
                 for d in run_domains}
    eval_step = make_eval_step(Placement(mcfg, mesh, rules,
                                         types.SimpleNamespace(params=p_shard)))

    masks, last = modules.train_masks(
        mcfg, params, batch_sampler(prepared, domains, args.batch, mesh, args.seed), domains,
        names=names, mesh=mesh, rules=rules, param_shardings=p_shard, steps=args.steps,
        lr=args.lr, init=args.init, size_weight=args.size_weight,
        share_weight=args.share_weight, seed=args.seed, log_every=max(args.steps // 10, 1))
    full = modules.domain_losses(eval_step, params, None, eval_sets)
    result = {"ckpt": ckpt, "tokenizer": tok.path, "domains": domains,
              "settings": {k: getattr(args, k) for k in (
                  "steps", "batch", "lr", "init", "size_weight", "share_weight", "embeddings",
                  "norms", "seed")} | {"eval_rows": eval_rows},
              "masked": {"tensors": names, "weights": modules.mask_size(masks[domains[0]])},
              "full_losses": full, "last_step": last, "modules": {}, "recompositions": {}}
    for d in domains:
        losses = modules.domain_losses(eval_step, params, masks[d], eval_sets)
        result["modules"][d] = {
            "density": float(modules.density(masks[d])), "loss": losses[d],
            "full_loss": full[d], "losses": losses,
            "layer_densities": modules.layer_densities(masks[d]),
            "kind_densities": modules.kind_densities(masks[d])}
    ov = modules.overlap_matrix(masks, domains)
    result["overlap"] = {"domains": domains, "matrix": ov.tolist()}
    union_all = modules.recompose(masks, domains)
    result["union_density"] = float(modules.density(union_all))
    rec_masks = {}
    for parts in recs:
        name = "+".join(parts)
        rec_masks[name] = modules.recompose(masks, parts)
        result["recompositions"][name] = {
            "domains": parts, "density": float(modules.density(rec_masks[name])),
            "losses": modules.domain_losses(eval_step, params, rec_masks[name], eval_sets)}
    result["forgetting_vs_overlap"] = forgetting_vs_overlap(run_results, domains,
                                                            result["overlap"]["matrix"])
    result["seconds"] = round(time.perf_counter() - t0, 1)

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, mask in [*((f"module_{d}", masks[d]) for d in domains),
                           *((f"recompose_{n}", m) for n, m in rec_masks.items())]:
            save_params(os.path.join(tmp, name), mcfg, modules.apply_mask(params, mask))
        np.savez_compressed(os.path.join(tmp, "masks.npz"), **{
            f"{d}/{n}": np.asarray(m, np.uint8) for d in domains for n, m in masks[d].items()})
        plot(result, os.path.join(tmp, "modules.png"))
        atomic.write_json(os.path.join(tmp, "modules.json"), result)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(table(result))
    print(f"union of all modules: density {result['union_density']:.3f}")
    for row in result["forgetting_vs_overlap"]:
        print(f"{row['domain']}: forgetting {row['forgetting']:+.3f}, mean overlap with the "
              f"later {'+'.join(row['later'])} modules {row['overlap_with_later']:.3f}")
    print(f"wrote {out}/modules.json, modules.png, masks.npz and masked params "
          f"({', '.join(f'module_{d}' for d in domains)}"
          + "".join(f", recompose_{n}" for n in rec_masks) + f") in {result['seconds']} s")
    print(f"score or export one: python scripts/evaluate.py --ckpt {out}/module_{domains[0]} "
          f"--tokenizer {tok.path} --hf_export HF_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
