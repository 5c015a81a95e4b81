"""Model and training configs: named profiles of transformers' `FlexOlmoForCausalLM`.

A profile bundles a model shape with the two training recipes (public model, expert):

    tiny   tests: a training run takes seconds
    demo   the sample federation and `flexolmo eval`: an 8.4M-parameter public model, trained
           once on the general public source and shipped (assets/public-model/), and 7 experts
           trained by `make demo`
    paper  a larger shape (6 layers, 512 positions), not run end to end
    gpu    `flexolmo eval` on one large GPU: a 126M-parameter public model (1,024 positions),
           sized so that the whole evaluation takes about 6 minutes there (`_gpu`'s arithmetic;
           flexolmo/evaluation/budget.py); not yet run on a GPU

Where a run trains and in which precision (`TrainConfig.device`, `.dtype`; `--device`,
`--dtype`) are settings of the run, not of the recipe: they are left out of `recipe()`, so a
model trained on a GPU in bfloat16 is the same artifact kind, with the same inputs, as one
trained on the CPU.

The public model is the same architecture with one expert (a dense FFN). The vocabulary
is not part of a profile: it is read from the workspace tokenizer when a model is built.

    from flexolmo.model.config import get_profile
    profile = get_profile("tiny")
    hf_config = profile.model.hf_config(vocab_size=400, eos_id=0, pad_id=1, num_experts=2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from flexolmo.base.errors import InputError
from flexolmo.model.device import DEVICE, DEVICES, DTYPE, resolve_dtype


@dataclass
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 512  # per expert; 4 x hidden as in OLMo 2
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4  # no grouped-query attention at these sizes: it saves nothing on CPU
    max_seq_len: int = 256  # RoPE positions; training windows are at most this long
    rope_theta: float = 10_000.0  # OLMo 2 uses 500k for 4k contexts; 10k suits 256 tokens
    top_k: int = 4  # experts per token in the merged model, clamped to the number of experts (the
    # paper's final model runs 4 of 8, gains plateau at 4); a 2-expert owner model uses both
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def hf_config(self, vocab_size: int, eos_id: int, pad_id: int, num_experts: int, top_k: int | None = None):
        """The transformers `FlexOlmoConfig` for this shape with `num_experts` experts."""
        from transformers import FlexOlmoConfig

        k = min(top_k or self.top_k, num_experts)
        return FlexOlmoConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            num_experts=num_experts,
            num_experts_per_tok=k,
            # False: the top-k weights are the softmax over *all* (switched-on) experts, as in
            # the paper; a switched-off expert's -inf logit then simply drops out of the sum.
            norm_topk_prob=False,
            tie_word_embeddings=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            bos_token_id=None,
        )


ROUTER_INITS = ("domain_mean", "domain_unit", "random", "classifier", "embedder")
# the first recipe (a bias starting at 0, no z-loss, a unit-length router row): what cards
# without recipe fields were trained with (their upgrade fills these in)
PREVIOUS_RECIPE = {"router_bias_init": 0.0, "router_z_loss": 0.0, "router_init": "domain_unit", "router_margin_std": None,
                   "router_bias_every": 0, "public_mix": 0.0}


# TrainConfig fields that say where and how a run computes, not what it computes: never part
# of a recipe (a model's inputs), nor of a run's resume identity
RUNTIME = ("device", "dtype")
# TrainConfig fields that only owner (expert) training reads: not part of the public recipe
EXPERT_ONLY = ("router_bias_init", "router_bias_target", "router_own_floor", "calibration_windows", "router_z_loss", "router_margin_std",
               "router_bias_every", "public_mix", "expert_scale_cap")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # sequences per step per process
    seq_len: int = 128
    lr: float = 3e-3  # small models tolerate (and need) a high LR to learn in a few hundred steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 20
    weight_decay: float = 0.1  # on matrices only; never on norms or the router bias (experts: 0, the paper's)
    grad_clip: float = 1.0
    seed: int = 1234
    checkpoint_every: int = 50  # steps between resume checkpoints (0: only at the end)
    log_every: int = 10  # loss-curve points recorded in the card
    embed_docs: int = 1000  # documents sampled for the domain embedding (router init)
    # router recipe of an owner's expert (paper section 3.3.2, appendix D.2); the public model
    # has one expert and a frozen router row, so these apply to expert training only, except
    # router_init, which also sets the public model's row 0 at the end of its training
    # start of the owner expert's bias b_i (<= 0; chosen where r_i.x + b_i > r_pub.x): None
    # calibrates it per layer so that the owner's model starts by preferring the public expert
    # on `router_bias_target` of public-text tokens (flexolmo/model/bias.py); a number fixes it
    router_bias_init: float | None = None
    router_bias_target: float = 0.8
    # ... but never so far that fewer than this share of the owner's own tokens prefer its own
    # expert (the paper's other half; flexolmo/model/bias.py `layer_shift`): the bias then gives up public
    # share down to this floor at most, and balances the two where both cannot hold. Run D without
    # it: news kept 55% of its own text (public text 84%); every other owner 77-93%. None: public
    # text only. Not applied under DP (it reads the owner's text outside the budget)
    router_own_floor: float | None = 0.7
    # the owner's router row is rescaled around the public row, per layer, so that its logit
    # margin over the public expert has this standard deviation on public text (flexolmo/model/bias.py
    # `scale_margin`): every owner's router in one unit; None keeps the embedding's raw scale
    # (std 8-43 logits, a saturated merged router). Softer routing merges better: measured on the
    # demo federation with public_mix 0.25 (docs/eval-diagnosis.md), merged geometric-mean
    # perplexity 196 at std 1 vs 213 at std 3, public text 106 vs 117. Without the public mix, std 1
    # left the creative owner's model sending only 65% of its own tokens to its expert; with it, 85%
    router_margin_std: float | None = 1.0
    # steps between recalibrations of a calibrated bias during training (0: only at the start).
    # The owner's expert moves the residual stream that the next layers' routers read, so a
    # start-only calibration drifts: measured (creative, demo profile) the owner's model preferred
    # the public expert on 80% of public-text tokens at the start and on 35% at the end (39% with
    # the router row frozen). Recalibrating keeps it at the target (flexolmo/model/bias.py `BiasTracker`)
    router_bias_every: int = 10
    # share of each owner-training batch drawn from public text (0: own text only). The owner's
    # expert and router row then also learn where the public expert is better, using data every
    # owner has. Measured on the demo federation (4k validation tokens per domain, margin std 3):
    # the owners' own models on public text 101-128 -> 92-98 (public model 80), merged 185 -> 117;
    # merged geometric mean 258 -> 213; own-domain cost of the owners' models at most +15%. At 0.5
    # the owners lose more on their own text (math 72 -> 119) for little: 0.25.
    # Not applied under DP (DP-SGD draws its own Poisson batches of the owner's windows)
    public_mix: float = 0.25
    calibration_windows: int = 24  # windows of public and of own text for the calibration and the end check
    # the owner's expert is never louder than this times the public expert (mean output norm on two
    # public windows, checked after every step; flexolmo/model/scale.py). Under the post-norm a louder
    # expert outbids the public one as a positive logit would, unseen by the clamp b <= 0; measured
    # without a cap, every demo owner's expert ended 1.4-2.9x louder. Capped at 1.0 (run G's recipe, 4k
    # tokens per domain) every owner's own model got better on 55 of 56 domain cells, but the merged
    # model got worse (gm 164 -> 168, public text 88 -> 98; docs/eval-diagnosis.md run H): opt-in.
    # None: no cap
    expert_scale_cap: float | None = None
    router_z_loss: float = 1e-3  # coefficient of the router z-loss (mean logsumexp(router logits)^2)
    # router row: "domain_mean" (the paper's recipe, the public model as embedder), "domain_unit" (old
    # recipe), "random", "classifier" (row 0 + a per-layer logistic regression of own vs public text on
    # the router's input; experimental) or "embedder" (the paper's off-the-shelf embedder,
    # all-MiniLM-L6-v2, through a fixed public projection; flexolmo/model/embedder.py)
    router_init: str = "domain_mean"
    # where the run trains: "cpu", "cuda", "cuda:N" or "auto" (flexolmo/model/device.py
    # `resolve_device`, resolved when the run starts: a config read from a card on a machine
    # without a GPU stays readable); under torchrun each rank uses its own GPU instead
    device: str = DEVICE
    # "float32", or "bfloat16": the forward pass under autocast, weights and optimizer state
    # stay float32 (master weights), the loss in float32
    dtype: str = DTYPE

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)  # InputError for a name that is not a dtype
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise InputError(f"device {self.device!r} is not a device; use one of {', '.join(DEVICES)} (or cuda:N)")
        if self.router_init not in ROUTER_INITS:
            raise InputError(f"router_init {self.router_init!r} is unknown: use one of {', '.join(ROUTER_INITS)}")
        if not 0.5 <= self.router_bias_target < 1:
            raise InputError(f"router_bias_target must be in [0.5, 1), got {self.router_bias_target}")
        if self.router_own_floor is not None and not 0.5 <= self.router_own_floor <= self.router_bias_target:
            raise InputError(f"router_own_floor must be in [0.5, router_bias_target={self.router_bias_target}] "
                             f"(or None), got {self.router_own_floor}")
        if self.router_bias_init is not None and self.router_bias_init > 0:
            raise InputError(f"router_bias_init must be <= 0 (the bias is clamped to <= 0), got {self.router_bias_init}")
        if self.router_margin_std is not None and self.router_margin_std <= 0:
            raise InputError(f"router_margin_std must be > 0 (or None for the raw scale), got {self.router_margin_std}")
        if not 0 <= self.public_mix < 1:
            raise InputError(f"public_mix is the public share of a batch, in [0, 1); got {self.public_mix}")
        if self.expert_scale_cap is not None and self.expert_scale_cap <= 0:
            raise InputError(f"expert_scale_cap must be > 0 (or None for no cap), got {self.expert_scale_cap}")
        if self.router_z_loss < 0:
            raise InputError(f"router_z_loss must be >= 0, got {self.router_z_loss}")

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * world_size

    def recipe(self) -> dict:
        """The settings a trained model depends on: every field but the `RUNTIME` ones."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME}


@dataclass
class Profile:
    name: str
    model: ModelConfig
    public: TrainConfig
    expert: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe(self, part: str) -> dict:
        """What a model trained with part `public` or `expert` depends on: the model's shape
        (top_k aside: an inference setting) and that part's training config (for the public
        model without the settings only owner training reads)."""
        shape = {k: v for k, v in asdict(self.model).items() if k != "top_k"}
        train = getattr(self, part).recipe()
        if part == "public":
            train = {k: v for k, v in train.items() if k not in EXPERT_ONLY}
        return {"model": shape, "train": train}

    def on(self, device: str | None = None, dtype: str | None = None) -> "Profile":
        """This profile with both recipes run on `device` in `dtype` (None: as they are)."""
        runtime = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if not runtime:
            return self
        return replace(self, public=override(self.public, **runtime), expert=override(self.expert, **runtime))

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        """A profile from `to_dict`'s output; settings a later version added take their defaults,
        settings it removed are dropped."""
        def known(kind, values: dict) -> dict:
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in values.items() if k in names}

        return cls(
            name=d["name"],
            model=ModelConfig(**known(ModelConfig, d["model"])),
            public=TrainConfig(**known(TrainConfig, d["public"])),
            expert=TrainConfig(**known(TrainConfig, d["expert"])),
        )


def _tiny() -> Profile:
    model = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=64)
    return Profile(
        name="tiny",
        model=model,
        public=TrainConfig(steps=12, batch_size=4, seq_len=32, warmup_steps=2, checkpoint_every=5, log_every=2, embed_docs=50),
        expert=TrainConfig(steps=10, batch_size=4, seq_len=32, warmup_steps=2, checkpoint_every=5, log_every=2, embed_docs=50,
                           weight_decay=0.0),
    )


def _demo() -> Profile:
    # 8.4M parameters with an 8192 vocabulary (4.2M of them embeddings + lm_head); 11.5M as a
    # 2-expert model. Measured on 2 idle cores (bench-model): public ~3.3k tokens/s, a
    # 2-expert owner model ~2.3k. The public model is trained once, at length, and shipped
    # with the repository (assets/public-model/); the demo trains only the owners' experts.
    model = ModelConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=256)
    return Profile(
        name="demo",
        model=model,
        # 1,000 steps x 4,096 tokens = 4.1M tokens, ~3.5 epochs of the public source
        public=TrainConfig(steps=1000, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=60, checkpoint_every=100),
        # experts start from a trained public FFN: 50 steps x 4,096 tokens (205k tokens, ~90 s each on
        # 2 idle cores), so that the first `make demo` stays near 15 minutes; the evaluation uses the same
        expert=TrainConfig(steps=50, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=5, checkpoint_every=25,
                           weight_decay=0.0, embed_docs=256),
    )


def _paper() -> Profile:
    # 10.5M parameters with an 8192 vocabulary (15.2M as a 2-expert model). Not yet run end to
    # end: estimated from the demo's throughput scaled by FLOPs, ~2k tokens/s public and
    # ~1.3k per expert on 2 idle cores, i.e. ~17 + 7 x 6 minutes.
    model = ModelConfig(hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=8, num_kv_heads=8, max_seq_len=512)
    return Profile(
        name="paper",
        model=model,
        public=TrainConfig(steps=500, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=50, checkpoint_every=100),
        expert=TrainConfig(steps=100, batch_size=16, seq_len=256, lr=1e-3, warmup_steps=10, checkpoint_every=50,
                           weight_decay=0.0),
    )


def _gpu() -> Profile:
    # `flexolmo eval` on one large GPU (H100/H200), so that the fidelity bars 2 CPU cores cannot
    # reach can be measured (docs/results.md, docs/benchmarks.md "GPU"). Not yet run on a GPU.
    # GPT-2-small's shape: 125.9M parameters with an 8192 vocabulary (15x demo), 210.8M as a
    # 2-expert owner model, 720.5M merged with 7 owners; 1,024 positions (demo: 256).
    # FLOPs of `flexolmo eval --profile gpu` (every row; flexolmo/evaluation/budget.py: 6·N per
    # token trained, 2·N per token forward, causal attention on top):
    #   experts      28 runs (7 owners, and again for each of 3 ablations) x 409,600 tokens
    #                x 6 x 210.8M = 14.5 PFLOP (15.2 with attention)
    #   calibration  1,316 forward passes x 6,144 tokens x 2 x 210.8M = 3.4 PFLOP (3.6)
    #   dense        7 x 409,600 tokens x 6 x 125.9M = 2.2 PFLOP (2.3)
    #   router tuning 409,600 tokens x 6 x 720.5M = 1.8 PFLOP; measurement 2.2 PFLOP
    #   total        25.0 PFLOP: 209 s at 120 TFLOP/s (30% of a 400 TFLOP/s bf16 peak), 78 s at 320
    #                (40% of 800); the 2.5 minutes left of 6 are for what kernel launches and disk
    #                bound (domain embeddings, merges, model loads, the next-line task's decoding)
    # The public model is trained once, beforehand (`flexolmo train public --profile gpu`):
    # 300 x 16,384 = 4.9M tokens (~4 epochs of the sample public source) x 6 x 125.9M = 3.7 PFLOP,
    # ~30 s at 120 TFLOP/s.
    model = ModelConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, num_kv_heads=12,
                        max_seq_len=1024)
    return Profile(
        name="gpu",
        model=model,
        public=TrainConfig(steps=300, batch_size=16, seq_len=1024, lr=1e-3, warmup_steps=30, checkpoint_every=100),
        # 50 steps x 8 x 1,024 = 409,600 tokens per expert (2x demo's 204,800); 6 calibration windows
        # of 1,024 tokens (demo: 24 of 256), so that the calibration passes stay a fraction of the training
        expert=TrainConfig(steps=50, batch_size=8, seq_len=1024, lr=1e-3, warmup_steps=5, checkpoint_every=25,
                           weight_decay=0.0, embed_docs=256, calibration_windows=6),
    )


# `flexolmo demo` trains the owners' experts under bfloat16 autocast (float32 master weights and
# optimizer state): 1.55x-1.86x the float32 rate on idle cores with avx512_bf16, about 1.0x-1.1x on
# loaded ones (docs/benchmarks.md). The evaluation and `flexolmo train` stay in float32 unless asked.
DEMO_EXPERT_DTYPE = "bfloat16"

PROFILES = {"tiny": _tiny, "demo": _demo, "paper": _paper, "gpu": _gpu}


def get_profile(name: str | Profile) -> Profile:
    """A fresh copy of a named profile (`tiny`, `demo`, `paper`, `gpu`)."""
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    return PROFILES[name]()


def override(cfg, **changes):
    """A copy of a config dataclass with some fields changed (unknown names are refused)."""
    names = {f.name for f in fields(cfg)}
    bad = set(changes) - names
    if bad:
        raise InputError(f"unknown setting(s) {', '.join(sorted(bad))}: use {', '.join(sorted(names))}")
    return type(cfg)(**{**asdict(cfg), **changes})
