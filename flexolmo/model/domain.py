"""Router rows from a *domain embedding*: the mean hidden state of a source's documents.

    row, how = router_row(public_model, ws, "news", cfg)

The paper (section 3.3.2) starts each expert's router row at the mean embedding of about
1,000 of the owner's documents, not normalised. Here the embedder is the public model
itself (its final hidden state after the last norm); `TrainConfig.router_init` chooses:

    domain_mean   the mean hidden state, as is (default; the paper's recipe, this embedder)
    domain_unit   the same, scaled to unit length (the first recipe's rows)
    random        a seeded random row (N(0, initializer_range)), for the ablation
    classifier    per layer, row 0 + an own-vs-public logistic regression on the router's input
                  (`classifier_rows`; experimental, measured in docs/eval-diagnosis.md)
    embedder      the paper's off-the-shelf embedder: row 0 + the difference of the mean
                  all-MiniLM-L6-v2 embeddings of the owner's and the public documents, through a
                  fixed public projection (`embedder_rows`; the evaluation's embedder_init row)

Under DP (`--dp-epsilon`), `dp_router_row` replaces the mean by a clipped, noised sum over
Poisson-sampled windows, one of the three mechanisms of the package's budget (privacy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexolmo.model.config import TrainConfig
from flexolmo.base.errors import InputError
from flexolmo.model.device import model_device
from flexolmo.model.moe import as_module, routers
from flexolmo.base.sources import iter_texts
from flexolmo.base.tokenizer import load_raw_tokenizer
from flexolmo.base.workspace import Workspace


def sample_texts(ws: Workspace, source: str, max_docs: int, seed: int = 0) -> list[str]:
    """Up to `max_docs` of `source`'s training documents, a seeded sample."""
    texts = list(iter_texts(ws, source, split="train"))
    g = torch.Generator().manual_seed(seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=g)[:max_docs].tolist()]


@torch.no_grad()
def domain_embedding(model, ws: Workspace, source: str, max_docs: int, seq_len: int, seed: int = 0,
                     unit: bool = False) -> tuple[torch.Tensor, int]:
    """Mean of the model's final hidden state over up to `max_docs` sampled training documents
    (each truncated to `seq_len` tokens); unit length if `unit`. Returns (vector (H,), n_docs)."""
    module = as_module(model)
    device = model_device(module)
    tok = load_raw_tokenizer(ws)
    was_training = module.training
    module.eval()
    total = torch.zeros(module.config.hidden_size, dtype=torch.float64, device=device)
    n = 0
    for enc in tok.encode_batch(sample_texts(ws, source, max_docs, seed), add_special_tokens=False):
        ids = enc.ids[:seq_len]
        if not ids:
            continue
        h = module.model(input_ids=torch.tensor([ids], device=device), use_cache=False).last_hidden_state[0]  # (T, H)
        total += h.mean(0).double()
        n += 1
    module.train(was_training)
    if n == 0:
        raise InputError(f"source {source!r} has no non-empty training documents")
    v = (total / n).float()
    return (v / v.norm().clamp_min(1e-8) if unit else v), n


def projection(dim_in: int, dim_out: int, seed: int = 0) -> torch.Tensor:
    """The fixed public projection (dim_in, dim_out) from the embedder's space to the model's
    hidden space: seeded N(0, 1/dim_out) entries, so a product with it keeps lengths and angles
    approximately (Johnson-Lindenstrauss). Data-independent, the same for every owner."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g, dtype=torch.float64) / dim_out ** 0.5


_EMBEDDINGS: dict[tuple, tuple[torch.Tensor, int]] = {}


def mean_embedding(ws: Workspace, source: str, embedder, max_docs: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """The embedder's mean embedding of up to `max_docs` sampled training documents of `source`
    and their number (kept per process: the evaluation trains seven owners against one public
    source)."""
    key = (str(ws.root), source, str(embedder.folder), max_docs, seed)
    if key not in _EMBEDDINGS:
        texts = [t for t in sample_texts(ws, source, max_docs, seed) if t.strip()]
        if not texts:
            raise InputError(f"source {source!r} has no non-empty training documents")
        _EMBEDDINGS[key] = embedder.embed(texts).double().mean(0), len(texts)
    return _EMBEDDINGS[key]


def embedder_rows(model, ws: Workspace, source: str, public_source: str, cfg: TrainConfig,
                  embedder=None) -> tuple[torch.Tensor, str]:
    """The paper's router-row start with an off-the-shelf embedder (flexolmo/model/embedder.py): in the
    paper the rows *are* the embedder's mean document embeddings (its width is the model's), so
    the owner-vs-public margin reads the hidden state along e_own - e_pub. Here the embedder (384 wide)
    and the model differ in width, so that difference goes through the fixed public
    `projection`: row_l = row 0_l + (e_own - e_pub) P in every layer l, with e the mean embedding of
    up to `cfg.embed_docs` sampled training documents (the public ones: data every owner has).
    Returns (L, H) rows."""
    from flexolmo.model.embedder import TextEmbedder

    embedder = embedder or TextEmbedder.load()
    own, n_own = mean_embedding(ws, source, embedder, cfg.embed_docs, cfg.seed)
    pub, n_pub = mean_embedding(ws, public_source, embedder, cfg.embed_docs, cfg.seed)
    hidden = as_module(model).config.hidden_size
    step = ((own - pub) @ projection(embedder.dim, hidden)).float().to(model_device(as_module(model)))
    rows = torch.stack([r.weight.detach()[0] + step for r in routers(as_module(model))])
    return rows, (f"domain embedding (embedder): row 0 + (mean {embedder.folder.parent.name} embedding of {n_own} sampled "
                  f"{source} training documents - that of {n_pub} {public_source} documents) x a fixed public projection "
                  f"({embedder.dim} -> {hidden}, seeded Gaussian, seed 0)")


def router_row(model, ws: Workspace, source: str, cfg: TrainConfig, public_source: str | None = None) -> tuple[torch.Tensor, str]:
    """The starting router row for `source` by `cfg.router_init`, and a sentence for the card
    (`embedder` needs `public_source`: its rows are the owner's embedding against the public one)."""
    if cfg.router_init == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        std = as_module(model).config.initializer_range
        row = torch.randn(as_module(model).config.hidden_size, generator=g) * std  # drawn on the CPU: the same row anywhere
        return row.to(model_device(as_module(model))), f"random: N(0, {std}^2), seed {cfg.seed}"
    if cfg.router_init == "embedder":
        if public_source is None:
            raise InputError("router_init 'embedder' sets the owner's row against the public source's documents: name it")
        return embedder_rows(model, ws, source, public_source, cfg)
    unit = cfg.router_init == "domain_unit"
    row, n = domain_embedding(model, ws, source, cfg.embed_docs, cfg.seq_len, seed=cfg.seed, unit=unit)
    how = "unit-length mean" if unit else "mean (not normalised)"
    return row, (f"domain embedding ({cfg.router_init}): {how} of the public model's final hidden state over {n} "
                 f"sampled {source} training documents (first {cfg.seq_len} tokens each)")


def classifier_rows(model, public_windows: torch.Tensor, own_windows: torch.Tensor, l2: float = 1e-3,
                    batch_size: int = 8) -> tuple[torch.Tensor, str]:
    """Router rows (L, H) as classifiers: in every layer, row 0 + w_l, where (w_l, c_l) is an L2-
    regularised logistic regression of own (1) vs public (0) tokens on that layer's router input
    (the public model's: at the start of owner training the two experts are the same FFN).

    Why: each owner fits its row alone, against the public expert only. For a multinomial logit
    with the public expert as reference class, log p(i|x) / p(pub|x) = w_i.x + c_i, and the
    binary regression on {i, pub} data recovers exactly that, so rows fitted apart are on one
    scale and comparable when merged. The intercepts are left to the bias calibration."""
    from flexolmo.model.bias import router_inputs

    pub, own = router_inputs(model, public_windows, batch_size), router_inputs(model, own_windows, batch_size)
    rows, accs = [], []
    row0 = [r.weight.detach()[0] for r in routers(as_module(model))]
    for l, (xp, xo) in enumerate(zip(pub, own)):
        w, _, acc = fit_own_vs_public(xp, xo, l2)
        rows.append(row0[l] + w)
        accs.append(round(acc, 3))
    return torch.stack(rows), (f"classifier: row 0 + a logistic regression of own vs public tokens on each layer's router "
                               f"input (L2 {l2}, {len(pub[0]):,} public and {len(own[0]):,} own tokens; training accuracy "
                               f"per layer {accs})")


def fit_own_vs_public(xp: torch.Tensor, xo: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, float, float]:
    """An L2-regularised logistic regression of own (`xo`, 1) vs public (`xp`, 0) rows, classes
    balanced: (weights, intercept) in the raw feature space, so that the log-odds of "own" at x
    is x.w + c, and the training accuracy. What one owner can fit alone (`classifier_rows`;
    bench/routing_probe.py compares such fits across owners)."""
    x = torch.cat([xp, xo]).double()
    y = torch.cat([torch.zeros(len(xp), device=x.device), torch.ones(len(xo), device=x.device)]).double()
    weight = torch.where(y == 1, len(x) / (2 * len(xo)), len(x) / (2 * len(xp)))
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    c_raw = float(b.detach() - (mu * w_raw).sum())
    acc = float((((z @ w + b) > 0).double() == y).double().mean())
    return w_raw.float(), c_raw, acc


@torch.no_grad()
def mean_hidden(model, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(n, H) mean final hidden state of each row of `ids` (n, T)."""
    module = as_module(model)
    device = model_device(module)
    was = module.training
    module.eval()
    out = [module.model(input_ids=ids[b : b + batch_size].to(device), use_cache=False).last_hidden_state.double().mean(1)
           for b in range(0, len(ids), batch_size)]
    module.train(was)
    return torch.cat(out) if out else torch.zeros(0, module.config.hidden_size, dtype=torch.float64, device=device)


def dp_router_row(model, own_windows: torch.Tensor, public_windows: torch.Tensor, plan, g: torch.Generator) -> tuple[torch.Tensor, str]:
    """The router row's starting value under DP (flexolmo/model/privacy.py, the `router_row` mechanism):
    a Poisson sample of the owner's windows (rate `plan.router_rate`), each window's mean
    hidden state clipped to C_r, summed, Gaussian noise of std `plan.router_sigma` x C_r,
    divided by the expected count. C_r is the median norm over public windows (public text:
    no privacy cost); it is recorded in `plan.router_clip`."""
    from flexolmo.model.privacy import gaussian_sum, poisson_sample

    seq_len = plan.seq_len
    clip = float(mean_hidden(model, public_windows[:, :seq_len]).norm(dim=1).median())
    pick = poisson_sample(len(own_windows), plan.router_rate, g)
    rows = mean_hidden(model, own_windows[pick][:, :seq_len])
    noisy, _ = gaussian_sum(rows, clip, plan.router_sigma, g)
    expected = plan.router_rate * len(own_windows)
    plan.router_clip = clip
    return (noisy / expected).float(), (
        f"DP domain embedding: a Poisson sample (rate {plan.router_rate:.4g}, expected {expected:.0f}) of the owner's "
        f"windows, each window's mean final hidden state of the public model clipped to norm {clip:.4g} (median over "
        f"public windows), summed + Gaussian noise of std {plan.router_sigma:.4g} x {clip:.4g}, / {expected:.1f}")
