"""Domain modules by binary weight masks: decomposition and recomposition of a trained model.

Kingetsu, Kobayashi and Suzuki 2021 ("Neural Network Module Decomposition and
Recomposition", arXiv 2112.13208) cut a trained network into one *module* per function by
learning a binary mask over its weights with the weights frozen (supermasks applied to a
trained model), with a loss that keeps each module's behaviour on its function, keeps the
module small and maximises the weights modules share. A model for a new combination of
functions is the *recomposition* of their modules: the union of their masks, with no
retraining; because modules share weights, the union stays small. Csordás, van Steenkiste
and Schmidhuber 2021 ("Are Neural Nets Modular?") learn such masks to ask which weights a
function depends on. Here a function is a domain (language) of a continually pre-trained
model: which weights each domain uses, how much domains share, and a smaller model for a
subset of domains.

Masks live on a flat dict keyed by the parameter's path, ``"layers/attn/q/kernel"``
(the naming of ``cpt_jax.train.checkpoint``): by default every weight matrix (the
attention and MLP kernels, and ``lm_head`` when untied); embeddings and norm scales only on
request. A domain's mask has its parameter's shape; stacked layers keep their leading layer
axis, so per-layer densities are a reduction over the other axes.

**Binarisation: Gumbel-sigmoid with a straight-through estimator** (``sample_masks``,
as Csordás et al. 2021). During training module k's mask is sampled,
``m = 1[s + l > 0]`` with logistic noise l (each weight kept with probability
``p = sigmoid(s)``), and the backward pass goes straight through the sigmoid:
``dm/ds := sigmoid(s + l) (1 - sigmoid(s + l))`` (``binarize``). Evaluation, export and
every reported number use the mode, ``1[s > 0]``. Why sampled rather than the deterministic
STE (noise 0) or a hard-concrete relaxation: with frozen, well-fitted weights the loss
gradient at the full model is near zero, so a deterministic STE lets the size term push
every logit down at the same rate until whole paths cross zero together, where the
gradient through a product of removed weights vanishes (``d/dw_gate`` of an MLP whose
``up`` weights are gone is 0). In the planted case of ``tests/test_modules.py`` (a module
whose domain the model fits to a loss of 1e-5) the deterministic STE ended at density 0
and loss 12.7 nats that way. Sampling removes a random ~1 - sigmoid(s) of the weights at every step, so the loss
feels each removal before it is made and important weights get their gradient back. The
forward pass stays binary (the module trained is a 0/1 mask of the weights, like the one
evaluated), which a continuous hard-concrete mask is not without a stretch and a
threshold to tune.

**Objective** (``objective``), for K domains with keep-probabilities p_k = sigmoid(s_k),
sampled masks m_k and frozen weights w:

    mean_k LM_k(w * m_k)  +  size_weight * mean_k E|m_k|/N  +  share_weight * E|U|/N

where LM_k is the token-mean next-token loss of the masked model on a batch of domain k,
N the number of maskable weights, ``E|m_k| = sum p_k`` and ``U = 1 - prod_k (1 - m_k)``
the union of all masks, ``E|U| = sum 1 - prod_k (1 - p_k)`` (the masks are sampled
independently). |U| is the size of the recomposition of all the domains, an upper bound
on the size of any recomposition. This is the paper's reasoning for its sharing term:
modules are later recomposed by union, so what should be small is the union, and a weight
costs nothing extra once another module holds it. The gradient says exactly that:
``dE|U|/dp_k = prod_{j != k} (1 - p_j)``, large only where module k is the sole holder of
the weight, so for the same loss the modules drift onto common weights instead of private
copies. (The paper states its term as maximising the weights shared between modules; with
the size term fixed, penalising the union is the same pressure, since |U| = sum_k |m_k| -
(the weights held more than once, counted with multiplicity).)

All functions are pure over the params pytree; ``make_mask_step`` is the jitted, sharded
step (the mask logits sharded like their parameters, batches over the batch axes, the
state donated), built on the train step's loss (``cpt_jax.core.losses.ce_loss_sum``) and
sharding helpers.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from cpt_jax import sharding as sharding_lib
from cpt_jax.core.losses import ce_loss_sum

Mask = dict  # {param path: array of the parameter's shape}, 1 = kept


# ----------------------------------------------------------------------------- naming


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def named_leaves(params) -> dict:
    """{"a/b/c": leaf} of the params pytree (checkpoint naming)."""
    return {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def maskable_names(params, embeddings: bool = False, norms: bool = False) -> list[str]:
    """Paths of the parameters that get a mask: every weight matrix (``*/kernel``), plus the
    embedding table and the norm scales when asked (off by default: a masked embedding row
    removes a token, a masked norm scale a whole feature, not a connection)."""
    out = []
    for name in named_leaves(params):
        leaf = name.rsplit("/", 1)[-1]
        if (leaf == "kernel" or (embeddings and leaf == "embedding")
                or (norms and leaf == "scale")):
            out.append(name)
    return out


def matrix_kind(name: str) -> str:
    """``"layers/attn/q/kernel"`` -> ``"attn/q"``; ``"embed/embedding"`` -> ``"embed"``."""
    parts = [p for p in name.split("/") if not re.fullmatch(r"layers(_\d+)?", p)]
    if parts[-1] in ("kernel", "scale", "embedding") and len(parts) > 1:
        parts = parts[:-1]
    return "/".join(parts)


# ------------------------------------------------------------------------------ masks


@jax.custom_vjp
def binarize(logits):
    """Hard mask ``1[logits > 0]`` (float32) with the straight-through gradient
    ``g * sigmoid(s) * (1 - sigmoid(s))`` (see the module docstring)."""
    return (logits > 0).astype(jnp.float32)


def _binarize_fwd(logits):
    return binarize(logits), logits


def _binarize_bwd(logits, g):
    s = jax.nn.sigmoid(logits.astype(jnp.float32))
    return ((g * s * (1.0 - s)).astype(logits.dtype),)


binarize.defvjp(_binarize_fwd, _binarize_bwd)


def init_logits(params, names, n_domains: int, init: float = 2.0) -> dict:
    """{name: [K, *shape] float32} all ``init`` (> 0: every module starts as the full model,
    and the size and sharing terms carve it down)."""
    leaves = named_leaves(params)
    return {n: jnp.full((n_domains, *leaves[n].shape), init, jnp.float32) for n in names}


def sample_masks(logits: dict, key=None) -> dict:
    """{name: [K, *shape]} binary masks with straight-through gradients: sampled with
    logistic noise (Gumbel-sigmoid, keep probability sigmoid(s)) when ``key`` is given,
    else the mode ``1[s > 0]``."""
    if key is None:
        return {n: binarize(s) for n, s in logits.items()}
    keys = jax.random.split(key, len(logits))
    return {n: binarize(s + jax.random.logistic(k, s.shape, s.dtype))
            for k, (n, s) in zip(keys, sorted(logits.items()))}


def keep_probabilities(logits: dict) -> dict:
    return {n: jax.nn.sigmoid(s) for n, s in logits.items()}


def apply_mask(params, mask: Mask):
    """params with every masked parameter multiplied by its mask (0 = weight removed);
    parameters without a mask are returned as they are."""
    def one(path, w):
        m = mask.get(_path_name(path))
        return w if m is None else w * m.astype(w.dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def mask_size(mask: Mask) -> int:
    return int(sum(np.prod(m.shape) for m in mask.values()))


def density(mask: Mask):
    """Fraction of the masked weights kept (differentiable through the STE)."""
    kept = sum(jnp.sum(m) for m in mask.values())
    return kept / mask_size(mask)


def union(masks) -> Mask:
    """Union of masks: ``1 - prod_k (1 - m_k)`` (= logical or on 0/1 masks)."""
    masks = list(masks)
    return {n: 1.0 - functools.reduce(jnp.multiply, [1.0 - m[n] for m in masks])
            for n in masks[0]}


def recompose(masks: dict, domains) -> Mask:
    """The module of a combination of domains: the union of their masks (Kingetsu et al.
    2021: no retraining). ``masks``: {domain: Mask}; ``domains``: names, or "a+b"."""
    if isinstance(domains, str):
        domains = domains.split("+")
    missing = [d for d in domains if d not in masks]
    if missing:
        raise ValueError(f"recompose: no module for {missing}; modules: {sorted(masks)}")
    return union(masks[d] for d in domains)


def jaccard(a: Mask, b: Mask) -> float:
    """|a and b| / |a or b| over all masked weights (1.0 for two empty masks)."""
    inter = sum(float(np.sum(np.logical_and(np.asarray(a[n]) > 0, np.asarray(b[n]) > 0)))
                for n in a)
    either = sum(float(np.sum(np.logical_or(np.asarray(a[n]) > 0, np.asarray(b[n]) > 0)))
                 for n in a)
    return inter / either if either else 1.0


def overlap_matrix(masks: dict, domains) -> np.ndarray:
    """[K, K] Jaccard overlap between the domains' masks."""
    return np.array([[jaccard(masks[a], masks[b]) for b in domains] for a in domains])


def layer_densities(mask: Mask) -> dict:
    """Where a module lives: {kind: [density of layer l]} for the per-layer matrices
    (stacked ``layers/...`` leaves: axis 0 is the layer; or ``layers_i/...``), the overall
    per-layer density under ``"all"``, and {kind: density} of the others (``lm_head``,
    ``embed``, ``final_norm``) under ``"other"``."""
    kept, total, other = {}, {}, {}
    for name, m in mask.items():
        m = np.asarray(m, np.float64) > 0
        kind = matrix_kind(name)
        per = re.match(r"layers_(\d+)/", name)
        if name.startswith("layers/"):
            k_l, t_l = m.reshape(m.shape[0], -1).sum(1), np.full(m.shape[0], m[0].size)
        elif per:
            i = int(per.group(1))
            k_l, t_l = np.zeros(i + 1), np.zeros(i + 1)
            k_l[i], t_l[i] = m.sum(), m.size
        else:
            other[kind] = float(m.mean())
            continue
        for key in (kind, "all"):
            a, b = kept.get(key, np.zeros(0)), total.get(key, np.zeros(0))
            n = max(len(a), len(k_l))
            kept[key] = np.pad(a, (0, n - len(a))) + np.pad(k_l, (0, n - len(k_l)))
            total[key] = np.pad(b, (0, n - len(b))) + np.pad(t_l, (0, n - len(t_l)))
    out = {k: (kept[k] / np.maximum(total[k], 1)).tolist() for k in kept}
    out["other"] = other
    return out


def kind_densities(mask: Mask) -> dict:
    """{kind: density} over all layers (``attn/q``, ``mlp/down``, ``lm_head``, ...)."""
    kept, total = {}, {}
    for name, m in mask.items():
        kind = matrix_kind(name)
        kept[kind] = kept.get(kind, 0.0) + float(np.sum(np.asarray(m) > 0))
        total[kind] = total.get(kind, 0) + int(np.prod(m.shape))
    return {k: kept[k] / total[k] for k in kept}


def hard_masks(logits: dict, domains) -> dict:
    """{domain: Mask} of boolean host arrays (the mode, ``1[s > 0]``) from trained logits
    [K, ...]; one byte per weight and domain."""
    return {d: {n: np.asarray(s[k]) > 0 for n, s in logits.items()}
            for k, d in enumerate(domains)}


# -------------------------------------------------------------------------- objective


def objective(config, params, logits: dict, batches: dict, domains, size_weight: float,
              share_weight: float, key=None):
    """(total loss, metrics) of the masks ``logits`` ({name: [K, ...]}): module k is scored
    on ``batches[domains[k]]``, masks sampled with ``key`` (None: the mode). The order is
    ``domains``, never the dict's: jit hands dicts back with their keys sorted. See the
    module docstring for the form and the reasoning of each term."""
    params = jax.lax.stop_gradient(params)  # the weights are frozen
    sampled = sample_masks(logits, key)
    probs = keep_probabilities(logits)
    metrics, lm = {}, []
    for k, name in enumerate(domains):
        mask_k = {n: m[k] for n, m in sampled.items()}
        total, aux = ce_loss_sum(config, apply_mask(params, mask_k), batches[name])
        lm.append(total / jnp.maximum(aux["tokens"], 1.0))
        metrics[f"loss/{name}"] = lm[-1]
        metrics[f"density/{name}"] = density({n: (s[k] > 0) for n, s in logits.items()})
    K = len(lm)
    mean_lm = sum(lm) / K
    expected_size = sum(density({n: p[k] for n, p in probs.items()}) for k in range(K)) / K
    expected_union = density(union({n: p[k] for n, p in probs.items()} for k in range(K)))
    metrics.update(lm=mean_lm, expected_density=expected_size, expected_union=expected_union,
                   union_density=density(union(
                       {n: (s[k] > 0).astype(jnp.float32) for n, s in logits.items()}
                       for k in range(K))))
    metrics["mean_density"] = sum(metrics[f"density/{n}"] for n in domains) / K
    total = mean_lm + size_weight * expected_size + share_weight * expected_union
    metrics["objective"] = total
    return total, metrics


@struct.dataclass
class MaskState:
    step: jax.Array
    logits: dict  # {name: [K, *shape]} float32
    opt_state: optax.OptState


def logit_shardings(logits: dict, param_shardings, mesh) -> dict:
    """Each mask logit [K, *shape] sharded like its parameter, the domain axis replicated."""
    flat = named_leaves(param_shardings)
    return {n: NamedSharding(mesh, P(None, *flat[n].spec)) for n in logits}


def init_mask_state(logits: dict, tx, shardings=None) -> MaskState:
    state = MaskState(step=jnp.zeros((), jnp.int32), logits=logits, opt_state=tx.init(logits))
    return state if shardings is None else jax.device_put(state, shardings)


def mask_state_shardings(logits: dict, tx, param_shardings, mesh) -> MaskState:
    """Shardings of a MaskState: Adam moments like the logits, scalars replicated."""
    l_shard = logit_shardings(logits, param_shardings, mesh)
    rep = sharding_lib.replicated(mesh)
    abstract = jax.eval_shape(tx.init, logits)
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, abstract, l_shard, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return MaskState(step=rep, logits=l_shard, opt_state=opt_shard)


def mask_step(config, tx, domains, size_weight, share_weight, seed, params,
              state: MaskState, batches):
    """One optimizer step on the mask logits (masks sampled with a key of (seed, step));
    the weights stay frozen."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    grad_fn = jax.grad(functools.partial(objective, config, params), has_aux=True)
    grads, metrics = grad_fn(state.logits, batches, domains, size_weight, share_weight, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    return state.replace(step=state.step + 1, logits=logits, opt_state=opt_state), metrics


def make_mask_step(config, tx, mesh, rules, param_shardings, state_shardings: MaskState,
                   domains, size_weight: float, share_weight: float, seed: int = 0):
    """``step(params, state, batches) -> (state, metrics)``: jitted with explicit shardings
    (params as in training, logits like their params, every batch over the batch axes),
    the mask state donated."""
    batch_shard = {d: {k: sharding_lib.batch_sharding(mesh, 2)
                       for k in ("tokens", "segment_ids")} for d in domains}
    jitted = jax.jit(
        functools.partial(mask_step, config, tx, tuple(domains), float(size_weight),
                          float(share_weight), int(seed)),
        in_shardings=(param_shardings, state_shardings, batch_shard),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)), donate_argnums=1)

    def step(params, state, batches):
        with sharding_lib.activate(mesh, rules):
            return jitted(params, state, {d: batches[d] for d in domains})

    return step


# ----------------------------------------------------------------- training, scoring


def train_masks(config, params, sample, domains, *, names, mesh, rules, param_shardings,
                steps: int, lr: float = 0.1, init: float = 2.0, size_weight: float = 0.5,
                share_weight: float = 0.5, seed: int = 0, log_every: int = 0, log=print):
    """Learn one mask per domain, jointly, with ``params`` frozen.

    ``sample(step) -> {domain: batch}`` gives each step's training batches (global arrays,
    ``tokens``/``segment_ids`` [B, L+1]). Adam on the logits, which start at ``init`` (every
    module = the full model); the masks' noise is drawn from ``seed``. Memory: the logits
    and Adam's two moments are 3 K float32 copies of the masked weights, sharded like them.
    Returns ({domain: Mask} of boolean host arrays, the last step's metrics as floats)."""
    domains = list(domains)
    tx = optax.adam(lr)
    logits = init_logits(params, names, len(domains), init)
    shard = mask_state_shardings(logits, tx, param_shardings, mesh)
    state = init_mask_state(logits, tx, shard)
    step = make_mask_step(config, tx, mesh, rules, param_shardings, shard, domains,
                          size_weight, share_weight, seed)
    metrics = {}
    for t in range(steps):
        state, metrics = step(params, state, sample(t))
        if log_every and (t % log_every == 0 or t == steps - 1):
            m = jax.device_get(metrics)
            log(f"mask step {t:4d}: lm {m['lm']:.3f} mean density {m['mean_density']:.3f} "
                f"union {m['union_density']:.3f}")
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return hard_masks(jax.device_get(state.logits), domains), metrics


def domain_losses(eval_step, params, mask: Mask | None, eval_sets: dict) -> dict:
    """{domain: token-weighted validation loss} of ``params`` masked by ``mask`` (None = the
    full model); ``eval_step`` is ``cpt_jax.train.step.make_eval_step``'s."""
    p = params if mask is None else apply_mask(params, mask)
    out = {}
    for name, batches in eval_sets.items():
        tot = cnt = 0.0
        for b in batches:
            s, c = eval_step(p, b)
            tot, cnt = tot + float(s), cnt + float(c)
        out[name] = tot / max(cnt, 1.0)
    return out
