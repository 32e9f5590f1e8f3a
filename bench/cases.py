"""What the DAAL benchmarks measure: the cases, torch-free (``bench/report.py`` reads the same tables).

One benchmark case is one (operator, shape, precision, provider, pass):

* operators: ``pairwise`` (pairwise distance), ``knn`` (k nearest neighbours), ``line_margin``
  (the fused adaptive line margin), ``loss`` (the whole ``DAALLoss``), ``train_step`` (one
  optimiser step of the VGG-19 embedding network with a loss: does the loss slow training?);
* providers: ``triton`` (``daal_triton.kernels.*``; for ``loss`` ``DAALLoss(backend="triton")``),
  ``triton_wave_splits`` (the kNN with its forward's column splits chosen as before the first
  H200 run, ``DAAL_KNN_SPLITS=waves``, beside the cost model that replaced it:
  kernels/knn.py, ``PROGRAM_OVERHEAD_TILES``), ``triton_atomic_own`` (the line
  margin, alone or in the loss, with the own-class rows of its segment gradient added by float32
  atomics into a float32 gradient as the 2026-11-30 run timed it, ``DAAL_LM_OWN_SEG=atomic``,
  beside the class lists that replaced them: kernels/line_margin.py, ``OWN_SEG_ENV``),
  ``triton_checked_merge`` (the kNN with its forward's merge as before 2026-12-01: rounds while
  any row takes, a block-wide check each, ``DAAL_KNN_MERGE=checked``, beside the counted merge
  that replaced it: kernels/knn.py, ``MERGE_ENV``), ``triton_separate`` (the kNN, the line
  margin or the loss with one launch per kernel as before 2026-12-01's evening,
  ``DAAL_LAUNCHES=separate``, beside the merged launches that replaced them: the kNN forward
  finishing its one split, the line margin's row and class kernels in one launch, its merge in
  the GEMM kernel, its last segment epilogue with dX; kernels/_common.py, ``LAUNCHES_ENV``),
  ``triton_tma`` (the kNN with its table tiles loaded through tensor descriptors, the
  Hopper TMA unit, ``DAAL_KNN_LOADS=tma``, beside the pointer loads: kernels/knn.py,
  ``LOADS_ENV``; timed by the runs until 2026-12-04, when the narrow tiles, always loaded so,
  became the default: no longer a case, since under them the variable changes nothing; its
  records stay in those runs), ``triton_table`` (the kNN with its forward on the table's 128 x 128
  tiles and pointer loads, the default until 2026-12-04, ``DAAL_KNN_TILES=table``, beside the
  narrow 64 x 128 tiles through descriptors that replaced it where descriptors apply:
  kernels/knn.py, ``NARROW_ENTRY``), ``triton_wide`` (the kNN with its forward's wide tiles,
  256 x 128 on 8 warps through tensor descriptors, where they apply: k <= 8, no labels;
  ``DAAL_KNN_TILES=wide``: kernels/knn.py, ``TILES_ENV``), ``triton_plain`` (the kNN with its
  float16/bfloat16 forward's epilogue as before 2026-12-04's evening, ``DAAL_KNN_EPILOGUE=plain``,
  beside the lean one that replaced it: the same slots with fewer instructions per tile;
  kernels/knn.py, ``EPILOGUE_ENV``), ``triton_gluon`` (the kNN with its forward in Gluon, the
  queries resident in shared memory, ``DAAL_KNN_TILES=gluon``, on sm_90 where the narrow tiles
  would run: kernels/knn_gluon.py), ``triton_gluon128`` (the same with 128 query rows per
  program on two warpgroups, ``DAAL_KNN_TILES=gluon128``), ``triton_threshold`` (the kNN
  selected by a threshold from a 1 / 16 sample, a filter that lists the few entries below it and
  a selection among them, ``DAAL_KNN_SELECT=threshold``: kernels/knn_threshold.py; where it
  applies: float16/bfloat16, no labels, k <= 16), ``triton_threshold_half`` (the same with a
  self-search's filter on half the tiles, ``s_ij = s_ji``, ``DAAL_KNN_SELECT=half``; where it
  applies: the queries are the references, every row's list at once),
  ``triton_unaligned`` (the kNN or the pairwise distance at a width that is no multiple of 16
  on its unpadded rows, as before 2026-12-02, ``DAAL_ALIGN_D=off``, beside the rows padded to
  16 columns that replaced them: kernels/_common.py, ``ALIGN_ENV``; the ``*_d129`` shapes; the
  pairwise distance's default again since the runs decided, so timed for the kNN only),
  ``triton_xu_difference`` (the line margin, alone or in the loss, with step 5's ``x.u`` taken
  as ``x.q - x.p`` from the segments themselves, as every run until 2026-12-04 timed it,
  ``DAAL_LM_XU=difference``, beside one dot with ``u`` from a copy ``[p~, u~]`` that replaced it
  for short segments' accuracy: kernels/line_margin.py, ``XU_ENV``), ``triton_copy_whole`` (the
  line margin with the forward's whole copy of the segments saved for the backward,
  ``DAAL_LM_COPY=whole``, beside the backward's copy per class chunk that replaced it: nothing
  C x 2 x D held from the forward to the backward; kernels/line_margin.py, ``COPY_ENV``).
  The switches the GPU runs have decided (``Switch.decided``: the wave splits, the atomic own
  rows, the checked merge, the separate launches, the table's and the wide tiles, PyTorch's
  glue) keep their providers for the ``full`` profile; the ``check`` profile no longer times
  them. Besides:
  ``eager`` (``daal_triton.reference.*``; ``DAALLoss(backend="reference")``), ``compile``
  (``torch.compile`` of the reference function) and, for kNN only, ``chunked`` (row chunks of
  ``torch.cdist`` + ``torch.topk``, the usual hand-written baseline); for ``train_step`` the loss
  the step trains with: ``triton`` / ``eager`` (``DAALLoss`` with backend "triton" / "reference"),
  ``proxyanchor`` (pytorch-metric-learning's ``ProxyAnchorLoss``, when installed) and
  ``ce_floor`` (a linear cross-entropy head on the embedding: the floor a loss cannot beat);
* passes: ``fwd`` (the forward with autograd recording, as in training; kNN retrieval
  evaluation runs under ``no_grad``), ``bwd`` (the backward alone: a fresh forward is built
  outside the timed region of every round) and ``fwdbwd``; ``train_step`` has the one pass
  ``step`` (forward, loss, backward, optimiser step).

Profiles: ``smoke`` (no CUDA: tiny shapes, float32, Triton's interpreter, one round; so the
files cannot rot), ``check`` (the subset ``bench/gpu_check.sh`` runs within its budget: every
target plus one representative per operator) and ``full`` (every combination).

Also here, from the shapes alone: the useful FLOPs of a call, the comparable GEMM of the matmul
baseline, and the estimated peak memory that decides beforehand whether a provider can fit.
``bench/problems.py`` builds a case's tensors, ``bench/runner.py`` measures and records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

GiB = 1024 ** 3
DTYPES = ("bf16", "fp32")
OPERATOR_PASSES = ("fwd", "bwd", "fwdbwd")
PASSES = OPERATOR_PASSES + ("step",)
PROFILES = ("smoke", "check", "full")
PROVIDERS = {
    "pairwise": ("triton", "eager", "compile", "triton_unaligned"),
    "knn": ("triton", "eager", "compile", "chunked", "triton_wave_splits", "triton_checked_merge",
            "triton_separate", "triton_table", "triton_wide", "triton_unaligned", "triton_plain",
            "triton_gluon", "triton_gluon128", "triton_threshold", "triton_threshold_half"),
    "line_margin": ("triton", "eager", "compile", "triton_atomic_own", "triton_separate", "triton_xu_difference",
                    "triton_copy_whole"),
    "loss": ("triton", "eager", "compile", "triton_aten_glue", "triton_graphed", "triton_atomic_own",
             "triton_separate", "triton_xu_difference"),
    "train_step": ("triton", "eager", "proxyanchor", "ce_floor"),
}

# ----------------------------------------------------------------------------- shapes
# kNN: ``labels`` = number of classes drawn for same-class search (None: any neighbour);
# ``self`` = query and reference are the same set (exclude_self=True); ``grad`` = differentiable use.
SHAPES: Dict[str, Dict[str, dict]] = {
    "pairwise": {
        "dml": dict(M=180, N=180, D=512),
        "large": dict(M=4096, N=4096, D=512),
        "bank": dict(M=1024, N=65536, D=512),
        # a width that is no multiple of 16: rows read unpadded (DAAL_ALIGN_D=pad: 144 columns)
        "large_d129": dict(M=4096, N=4096, D=129),
        # sizes that are no multiple of 16 (4,104 = 16 x 256 + 8): the backward's H stored 16 columns
        # wide, so its GEMM loads stay vector loads (kernels/pairwise.py); beside "large", the
        # odd size's cost in one run (the work grows by (4,104 / 4,096)^2 = 1.004)
        "large_odd": dict(M=4104, N=4104, D=512),
    },
    "knn": {
        "dml": dict(M=180, N=180, D=512, k=3, labels=100, self=True, grad=True),
        "bank": dict(M=1024, N=65536, D=512, k=8, labels=None, self=False, grad=True),
        "eval60k": dict(M=60000, N=60000, D=512, k=8, labels=None, self=True, grad=False),
        "bank_d129": dict(M=1024, N=65536, D=129, k=8, labels=None, self=False, grad=True),
    },
    "line_margin": {
        "dml": dict(B=180, C=100, D=512),
        "large": dict(B=4096, C=1000, D=512),
        "classes11k": dict(B=1024, C=11318, D=512),
        "classes100k": dict(B=1024, C=100000, D=512),
        # 1M classes: only the Triton kernels fit (eager / compile would hold B x C matrices)
        "classes1m": dict(B=4096, C=1000000, D=512),
    },
    "loss": {
        "dml": dict(B=180, C=100, D=512),
        "large": dict(B=4096, C=1000, D=512),
        "classes11k": dict(B=1024, C=11318, D=512),
        "classes100k": dict(B=1024, C=100000, D=512),
    },
    # arch x batch (P x K = 45 x 4, and 512) x classes (C=11,318: Stanford Online Products);
    # D = the embedding size, H = the image side (synthetic images already on the device).
    "train_step": {f"{arch.replace('_', '')}-b{B}-c{'11k' if C > 1000 else C}":
                   dict(arch=arch, B=B, C=C, D=512, H=224)
                   for arch in ("vgg19_bn", "vgg19") for B in (180, 512) for C in (100, 11318)},
}
SMOKE_SHAPES: Dict[str, Dict[str, dict]] = {
    "pairwise": {"tiny": dict(M=8, N=12, D=16)},
    "knn": {"tiny": dict(M=32, N=40, D=16, k=3, labels=5, self=False, grad=True)},
    "line_margin": {"tiny": dict(B=8, C=5, D=16)},
    "loss": {"tiny": dict(B=8, C=5, D=16)},
    # the training program's VGG-19 with 1/16 of its channels (``width``), 32 x 32 images
    "train_step": {"tiny": dict(arch="vgg19", B=12, C=5, D=16, H=32, width=1 / 16)},
}
# The whole loss computes in float32 whatever the embeddings' dtype (docs/method.md step 1: float32 "or
# wider"), so it is benchmarked in float32 only. The operators in bfloat16 and float32 (TF32).
# The training step runs under bf16 autocast (float32 without autocast in the smoke mode).
OP_DTYPES = {"pairwise": ("bf16", "fp32"), "knn": ("bf16", "fp32"),
             "line_margin": ("bf16", "fp32"), "loss": ("fp32",), "train_step": ("bf16",)}


# ----------------------------------------------------------------------------- targets (H200)
class Target(NamedTuple):
    """One performance target, as ``bench/report.py`` evaluates it: ``kind`` "fraction" (of the
    matmul throughput, at least ``threshold``), "speedup" (over provider ``other``, at least),
    "memory" (peak extra memory over ``other``'s, at most) or "overhead" (the time added to
    provider ``other``'s, as a fraction of it, at most: time(triton) / time(other) - 1)."""

    title: str
    op: str
    shape: str
    dtype: str
    pass_: str
    kind: str
    other: Optional[str]
    threshold: float


# Each target names the issue that set it: issue 6's (still open: blocked on a GPU) stand beside
# issue 13's, which are a nearer step on two of them (kNN 60% of matmul, the whole loss 3x eager);
# a row can therefore pass where its issue-6 neighbour fails.
# "a small fraction" of eager's peak memory, as the report reads it.
SMALL_FRACTION = 0.10
TARGETS: Tuple[Target, ...] = (
    Target("kNN 60k×60k (bf16, fwd): Triton ≥ 50% of matmul throughput (issue 6)", "knn", "eval60k", "bf16", "fwd",
           "fraction", None, 0.5),
    Target("kNN 60k×60k (bf16, fwd): Triton ≥ 3× chunked torch (cdist + topk) (issues 6, 13)", "knn", "eval60k", "bf16", "fwd",
           "speedup", "chunked", 3.0),
    # issue 13: the kNN at 60% of matmul (the 3x chunked bar is the one above)
    Target("kNN 60k×60k (bf16, fwd): Triton ≥ 60% of matmul throughput (issue 13)", "knn", "eval60k", "bf16",
           "fwd", "fraction", None, 0.6),
    Target("Line margin B=1024, C=100k (bf16), fwd+bwd: ≥ 10× eager (issue 6)", "line_margin", "classes100k", "bf16",
           "fwdbwd", "speedup", "eager", 10.0),
    Target("Line margin B=1024, C=100k (bf16), fwd+bwd: ≥ 3× torch.compile (issue 6)", "line_margin", "classes100k", "bf16",
           "fwdbwd", "speedup", "compile", 3.0),
    Target("Line margin B=1024, C=100k (bf16), fwd+bwd: ≥ 50% of matmul throughput (issue 6)", "line_margin", "classes100k",
           "bf16", "fwdbwd", "fraction", None, 0.5),
    Target(f"Line margin B=1024, C=100k (bf16), fwd+bwd: peak extra memory ≤ {SMALL_FRACTION:.0%} of eager's (issue 6)",
           "line_margin", "classes100k", "bf16", "fwdbwd", "memory", "eager", SMALL_FRACTION),
    # issue 12 (the second design): also at most 5% of torch.compile's peak extra memory (its
    # speed bars, >= 5x eager and >= 1x compile, are implied by the targets above)
    Target("Line margin B=1024, C=100k (bf16), fwd+bwd: peak extra memory ≤ 5% of torch.compile's (issue 12)",
           "line_margin", "classes100k", "bf16", "fwdbwd", "memory", "compile", 0.05),
    Target("DML batch B=180 (fp32): whole DAALLoss fwd+bwd ≥ 5× eager (issue 6)", "loss", "dml", "fp32", "fwdbwd",
           "speedup", "eager", 5.0),
    Target("DML batch B=180 (fp32): whole DAALLoss fwd+bwd ≥ 3× eager (issue 13)", "loss", "dml", "fp32",
           "fwdbwd", "speedup", "eager", 3.0),
    Target("Training step VGG-19-BN 224², B=180, C=100 (bf16): DAAL (Triton) adds ≤ 2% to the CE floor's step (issue 17)",
           "train_step", "vgg19bn-b180-c100", "bf16", "step", "overhead", "ce_floor", 0.02),
    Target("Training step VGG-19-BN 224², B=180, C=100 (bf16): DAAL (Triton) step no slower than ProxyAnchor's (issue 17)",
           "train_step", "vgg19bn-b180-c100", "bf16", "step", "overhead", "proxyanchor", 0.0),
    Target("Training step VGG-19-BN 224², B=180, C=11,318 (bf16): DAAL (Triton) adds ≤ 5% to the CE floor's step (issue 17)",
           "train_step", "vgg19bn-b180-c11k", "bf16", "step", "overhead", "ce_floor", 0.05),
)
# The (op, shape, dtype) a target names: those cases run first, so that a run cut short by its
# time budget still has them.
TARGET_KEYS = frozenset((t.op, t.shape, t.dtype) for t in TARGETS)
#: The cases the targets compare: (op, shape, dtype, pass, provider), Triton's and the other
#: provider's ("fraction" targets time the matmul baseline within Triton's case).
TARGET_CASES = frozenset((t.op, t.shape, t.dtype, t.pass_, prov) for t in TARGETS
                         for prov in ("triton",) + ((t.other,) if t.other else ()))

# ----------------------------------------------------------------------------- switches
class Switch(NamedTuple):
    """An internal switch kept until a GPU run decides (the brief's rule for a design that
    replaces one no GPU has timed), timed by every run until then (``decided``: not after): the
    environment variable, its default and alternative values, the provider that runs the
    alternative, and the (op, shape, dtype, pass) cases where the report sets the two side by
    side. ``memory``: peak memory is part of the decision."""

    env: str
    default: str
    alternative: str
    provider: str
    cases: Tuple[Tuple[str, str, str, str], ...]
    memory: bool = False
    #: the first day a GPU run would time it (ISO date): a later run without the alternative's
    #: record shows the row as not measured instead of leaving it out (bench/report.py)
    since: str = ""
    #: the last day the switch had this meaning (ISO date; "" while it has): a run's default or
    #: alternative was another design after it. A run that records its switches (env.json
    #: "switches": [env, default, alternative] each, since 2026-12-04's evening) is matched by them.
    until: str = ""
    #: what the GPU runs decided ("" while undecided): the default kept, and why. A decided switch
    #: is no longer timed (``until`` is the last day a run timed it); its variable still selects
    #: the alternative. bench/report.py's README lists each decided switch with every committed
    #: run's reading of its first case (the one that decides), and a test checks that at least
    #: two runs read the kept value faster there (or, for a ``memory`` switch, leaner) and none
    #: the other faster.
    decided: str = ""
    #: the value a decision kept, where it is the alternative ("": the default): the code's
    #: default became the alternative, which its variable's former default now selects
    kept: str = ""

    def applies_to(self, env: dict) -> bool:
        """Whether a run (its env.json) ran this switch's default and alternative: by the
        switches it recorded, else by its date within [since, until]."""
        recorded = env.get("switches")
        if isinstance(recorded, list):
            return [self.env, self.default, self.alternative] in recorded
        date = str(env.get("date", ""))[:10]
        return not date or ((not self.since or date >= self.since) and (not self.until or date <= self.until))


SWITCHES: Tuple[Switch, ...] = (
    Switch("DAAL_KNN_MERGE", "counted", "checked", "triton_checked_merge",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd")), since="2026-12-01",
           until="2026-12-04", decided="counted: 1.34-1.35x faster at 60k in both runs of the narrow tiles, "
                                       "never slower; the bank within 3% in two runs, 1.04x faster in the third"),
    Switch("DAAL_KNN_SPLITS", "model", "waves", "triton_wave_splits",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd"), ("knn", "bank", "bf16", "fwdbwd")),
           since="2026-12-01", until="2026-12-04",
           decided="model: 2.3-2.4x faster at 60k in three runs (the waves' grid needs 1.8 GB of slots); "
                   "the bank within 11% either way (0.89-1.07x)"),
    Switch("DAAL_LM_OWN_SEG", "lists", "atomic", "triton_atomic_own",
           (("line_margin", "classes100k", "bf16", "fwdbwd"), ("line_margin", "classes100k", "bf16", "bwd"),
            ("loss", "dml", "fp32", "fwdbwd")), memory=True, since="2026-12-01", until="2026-12-04",
           decided="lists: 418 MB against 711 MB of peak memory at 100k classes, as fast or faster "
                   "(within 3%) in 6 of 7 timed rows, strictly faster in 5"),
    Switch("DAAL_GLUE", "fused", "aten", "triton_aten_glue",
           (("loss", "dml", "fp32", "fwd"), ("loss", "dml", "fp32", "bwd"), ("loss", "dml", "fp32", "fwdbwd")),
           since="2026-11-30", until="2026-12-04",
           decided="fused: 1.55-3.14x faster in every row of the three runs of 2026-12-04, with less "
                   "memory forward and forward + backward (the backward's peak equal, 2.86 MB; the "
                   "first run, with an earlier fused glue, read its backward 0.76x)"),
    Switch("DAAL_LAUNCHES", "merged", "separate", "triton_separate",
           (("loss", "dml", "fp32", "fwd"), ("loss", "dml", "fp32", "bwd"), ("loss", "dml", "fp32", "fwdbwd"),
            ("knn", "dml", "bf16", "fwd"), ("line_margin", "dml", "bf16", "fwdbwd")), since="2026-12-01",
           until="2026-12-04", decided="merged: 1.23-1.56x faster forward in three runs, faster in 12 "
                                       "of 14 timed rows, slower in 2"),
    # the table tiles' loads: timed until the narrow tiles (always through descriptors) became
    # the default on 2026-12-04; the variable still chooses the table tiles' loads
    Switch("DAAL_KNN_LOADS", "pointer", "tma", "triton_tma",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd")), since="2026-12-01",
           until="2026-12-04"),
    Switch("DAAL_KNN_TILES", "table", "wide", "triton_wide",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd")), since="2026-12-02",
           until="2026-12-04"),
    # the narrow tiles (64 x 128 through descriptors) beside the table's 128 x 128 they replaced
    # and the wide 256 x 128 (the 2026-12-04 run timed the narrow ones by bench/tune_knn.py alone):
    # timed only by the two runs of 2026-12-04's evening, which recorded their switches (so no
    # date falls within [since, until])
    Switch("DAAL_KNN_TILES", "narrow", "table", "triton_table",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd"), ("knn", "bank", "bf16", "fwdbwd"),
            ("knn", "dml", "bf16", "fwd")), since="2026-12-05", until="2026-12-04",
           decided="narrow where the query rows fill the GPU: 1.35-1.38x faster at 60k in two runs; the "
                   "table's tiles elsewhere (the narrow policy's own choice since a451bdb, after the "
                   "second run timed them faster on the bank)"),
    Switch("DAAL_KNN_TILES", "narrow", "wide", "triton_wide",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd")), since="2026-12-05",
           until="2026-12-04", decided="narrow: 1.11x faster at 60k and 1.18-1.19x on the bank in two runs"),
    # the lean epilogue (padded norms read unmasked, float32 counts, the narrow entry's diagonal
    # branch) beside the plain one it replaced: no GPU has timed either against the other
    Switch("DAAL_KNN_EPILOGUE", "lean", "plain", "triton_plain",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd"), ("knn", "dml", "bf16", "fwd")),
           since="2026-12-05"),
    # the Gluon forward (queries resident in shared memory; sm_90, where the narrow tiles run):
    # a candidate no GPU has run
    Switch("DAAL_KNN_TILES", "narrow", "gluon", "triton_gluon", (("knn", "eval60k", "bf16", "fwd"),),
           since="2026-12-05"),
    # and its 128-row variant (two warpgroups sharing the ring: half the L2 traffic, one program per SM)
    Switch("DAAL_KNN_TILES", "narrow", "gluon128", "triton_gluon128", (("knn", "eval60k", "bf16", "fwd"),),
           since="2026-12-05"),
    # selection by a threshold instead of the running merge (kernels/knn_threshold.py): a
    # candidate no GPU has run
    Switch("DAAL_KNN_SELECT", "merge", "threshold", "triton_threshold",
           (("knn", "eval60k", "bf16", "fwd"), ("knn", "bank", "bf16", "fwd")), memory=True, since="2026-12-05"),
    # and with a self-search's filter on half the tiles (s_ij = s_ji): half the GEMM
    Switch("DAAL_KNN_SELECT", "merge", "half", "triton_threshold_half", (("knn", "eval60k", "bf16", "fwd"),),
           memory=True, since="2026-12-05"),
    # the rows padded to 16 columns at an odd width (DAAL_ALIGN_D=pad, then the default for both
    # operators) beside the unpadded ones (=off), as the runs of 2026-12-02 to 2026-12-04 timed them:
    # for the kNN (split: still timed, below, as "auto" against "off") and for the pairwise
    # distance, decided for the unpadded rows (kernels/_common.py, ALIGN_DEFAULT)
    Switch("DAAL_ALIGN_D", "pad", "off", "triton_unaligned",
           (("knn", "bank_d129", "bf16", "fwd"), ("knn", "bank_d129", "bf16", "fwdbwd")), memory=True,
           since="2026-12-02", until="2026-12-04"),
    Switch("DAAL_ALIGN_D", "pad", "off", "triton_unaligned", (("pairwise", "large_d129", "bf16", "fwdbwd"),),
           memory=True, since="2026-12-02", until="2026-12-04", kept="off",
           decided="off for the pairwise distance: the unpadded rows 0.63-0.89x the padded time in all "
                   "three runs, with less memory (the padding's copies are 10 of the forward and "
                   "backward's 18 launches); the default (auto, DAAL_ALIGN_D unset) leaves its rows "
                   "unpadded and pads the kNN's (timed below); padded with DAAL_ALIGN_D=pad"),
    # step 5's x.u as one dot with u from the copy [p~, u~] (exact t for short segments; the copy
    # costs C x 2 x D in x's dtype where the segments were used as they are) beside x.q - x.p
    Switch("DAAL_LM_XU", "dot", "difference", "triton_xu_difference",
           (("line_margin", "classes100k", "bf16", "fwdbwd"), ("line_margin", "dml", "bf16", "fwdbwd"),
            ("loss", "dml", "fp32", "fwdbwd")), memory=True, since="2026-12-06"),
    # the backward's copy of the segments chunk by chunk (nothing C x 2 x D kept from the forward)
    # beside the forward's whole copy saved for it (the copy of DAAL_LM_XU=dot, as first made)
    Switch("DAAL_LM_COPY", "chunks", "whole", "triton_copy_whole",
           (("line_margin", "classes100k", "bf16", "fwdbwd"),), memory=True, since="2026-12-06"),
    # "auto" (DAAL_ALIGN_D unset): the kNN pads, beside its unpadded rows
    Switch("DAAL_ALIGN_D", "auto", "off", "triton_unaligned",
           (("knn", "bank_d129", "bf16", "fwd"), ("knn", "bank_d129", "bf16", "fwdbwd")), memory=True,
           since="2026-12-05"),
)
#: The switches the runs still time (neither decided nor retired with their design).
TIMED_SWITCHES: Tuple[Switch, ...] = tuple(sw for sw in SWITCHES if not sw.until)
#: The cases the timed switches compare: (op, shape, dtype, pass, provider), the default's and
#: the alternative's.
SWITCH_CASES = frozenset(case + (prov,) for sw in TIMED_SWITCHES for case in sw.cases for prov in ("triton", sw.provider))
#: Time differences within this fraction are not a decision (run-to-run noise of a median).
SWITCH_NOISE = 0.03


# What ``bench/gpu_check.sh`` runs (profile "check"): (op, shape) -> dtypes, providers, passes.
CHECK: Dict[Tuple[str, str], List[dict]] = {
    # (the switches decided by the GPU runs, ``Switch.decided``, are no longer timed here: the
    # checked merge, the wave splits, the table and wide tiles on these shapes, the atomic own-class
    # rows, PyTorch's glue, the separate launches)
    # the plain epilogue the lean one replaced (DAAL_KNN_EPILOGUE=plain)
    # and the Gluon forwards (DAAL_KNN_TILES=gluon, gluon128: the queries resident in shared memory)
    # and the selection by a threshold (DAAL_KNN_SELECT=threshold; after the others: a kernel no GPU
    # has run, unlike the Gluon forwards not vetted in a child process first)
    ("knn", "eval60k"): [dict(dtypes=("bf16",), providers=("triton", "chunked", "triton_gluon", "triton_gluon128",
                                                        "triton_plain", "triton_threshold", "triton_threshold_half",
                                                        "eager"))],
    # x.u as x.q - x.p (DAAL_LM_XU=difference: the timed design, no copy of the segments), and the
    # forward's whole copy saved for the backward (DAAL_LM_COPY=whole)
    ("line_margin", "classes100k"): [
        dict(dtypes=("bf16",), providers=("triton", "eager", "compile")),
        dict(dtypes=("bf16",), providers=("triton_xu_difference", "triton_copy_whole"), passes=("fwdbwd",)),
        dict(dtypes=("fp32",), providers=("triton", "eager"))],
    # the module through torch.cuda.make_graphed_callables (README, "Small batches")
    ("loss", "dml"): [dict(dtypes=("fp32",), providers=("triton", "eager", "triton_graphed")),
                      dict(dtypes=("fp32",), providers=("triton_xu_difference",), passes=("fwdbwd",))],
    # the loss's in-batch kNN: launch-bound, where the finish's launch count shows
    ("knn", "dml"): [dict(dtypes=("bf16",), providers=("triton",), passes=("fwd", "fwdbwd")),
                     dict(dtypes=("bf16",), providers=("triton_plain",), passes=("fwd",))],
    ("knn", "bank"): [dict(dtypes=("bf16",), providers=("triton", "chunked", "eager"), passes=("fwd", "fwdbwd")),
                      dict(dtypes=("bf16",), providers=("triton_plain", "triton_threshold"), passes=("fwd",))],
    ("pairwise", "large"): [dict(dtypes=("bf16", "fp32"), providers=("triton", "eager"))],
    # an odd width: the kNN's padded rows beside the unaligned ones (DAAL_ALIGN_D=off); the
    # pairwise distance's unpadded rows (its default since the runs decided: no longer timed padded)
    ("knn", "bank_d129"): [dict(dtypes=("bf16",), providers=("triton", "triton_unaligned", "chunked"),
                                passes=("fwd", "fwdbwd"))],
    ("pairwise", "large_d129"): [dict(dtypes=("bf16",), providers=("triton",), passes=("fwdbwd",))],
    ("pairwise", "large_odd"): [dict(dtypes=("bf16",), providers=("triton",), passes=("bwd",))],
    ("line_margin", "dml"): [dict(dtypes=("bf16",), providers=("triton", "eager")),
                             dict(dtypes=("bf16",), providers=("triton_xu_difference",), passes=("fwdbwd",))],
    ("line_margin", "large"): [dict(dtypes=("bf16",), providers=("triton", "eager"), passes=("fwdbwd",))],
    ("line_margin", "classes11k"): [dict(dtypes=("bf16",), providers=("triton", "eager"), passes=("fwdbwd",))],
    # 1M classes: Triton only fits; eager and compile are recorded (skipped by the memory estimate,
    # or out of memory)
    ("line_margin", "classes1m"): [dict(dtypes=("bf16",), providers=("triton", "eager", "compile"),
                                        passes=("fwdbwd",))],
    ("loss", "classes100k"): [dict(dtypes=("fp32",), providers=("triton", "eager"), passes=("fwdbwd",))],
    # the training step: the targets' shapes only (VGG-19-BN, B=180); the DAAL reference at C=100
    ("train_step", "vgg19bn-b180-c100"): [dict(dtypes=("bf16",), providers=PROVIDERS["train_step"])],
    ("train_step", "vgg19bn-b180-c11k"): [dict(dtypes=("bf16",), providers=("triton", "proxyanchor", "ce_floor"))],
}

CPU_COMPILE_REASON = ("torch.compile provider not run in the CPU smoke mode: inductor's C++ "
                      "compilation takes ~20 s per graph on 2 cores (it runs on the GPU; "
                      "--bench-compile-on-cpu forces it)")


# ----------------------------------------------------------------------------- cases
def passes_for(op: str, dims: dict) -> Tuple[str, ...]:
    if op == "train_step":
        return ("step",)
    if op == "knn" and not dims.get("grad", True):
        return ("fwd",)
    return OPERATOR_PASSES


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    dims_items: Tuple[Tuple[str, object], ...]
    dtype: str
    provider: str
    pass_: str
    target: bool = False
    static_skip: str = ""

    @property
    def dims(self) -> dict:
        return dict(self.dims_items)

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.dtype}-{self.provider}-{self.pass_}"

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape} {self.dtype} {self.pass_}"

    def describe(self) -> dict:
        return dict(op=self.op, shape=self.shape, dims=self.dims, dtype=self.dtype,
                    provider=self.provider, pass_=self.pass_, target=self.target)


def _smoke_cases(op: str, compile_on_cpu: bool) -> List[Case]:
    """Float32, every provider, every pass; the compile provider forward only (and skipped
    unless ``compile_on_cpu``)."""
    out: List[Case] = []
    for shape, dims in SMOKE_SHAPES[op].items():
        for provider in PROVIDERS[op]:
            passes = passes_for(op, dims)
            if provider == "compile":
                passes = passes[:1]
            for p in passes:
                skip = CPU_COMPILE_REASON if provider == "compile" and not compile_on_cpu else ""
                out.append(Case(op, shape, tuple(dims.items()), "fp32", provider, p, False, skip))
    return out


def _profile_cases(op: str, profile: str) -> List[Case]:
    """The ``check`` subset (``CHECK``) or the ``full`` product, in the order of the tables."""
    out: List[Case] = []
    for shape, dims in SHAPES[op].items():
        if profile == "check":
            specs = CHECK.get((op, shape), [])
        else:
            specs = [dict(dtypes=OP_DTYPES[op], providers=PROVIDERS[op])]
        allowed = passes_for(op, dims)
        for spec in specs:
            for dtype in spec["dtypes"]:
                for provider in spec["providers"]:
                    for p in spec.get("passes", allowed):
                        if p in allowed:
                            out.append(Case(op, shape, tuple(dims.items()), dtype, provider, p,
                                            (op, shape, dtype, p, provider) in TARGET_CASES))
    return out


def cases_for(op: str, profile: str, *, compile_on_cpu: bool = False) -> List[Case]:
    """The cases of operator ``op`` in ``profile`` (``smoke``, ``check`` or ``full``), targets first."""
    if profile == "smoke":
        return _smoke_cases(op, compile_on_cpu)
    return sorted(_profile_cases(op, profile), key=order_key)


HEAVY_BYTES = 32 * GiB


#: (op, shape, dtype) of the open issue's targets (issue 13: the kNN at 60k x 60k, the whole loss
#: at B = 180): they run before the other targets, so a GPU run cut short by its budget (the test
#: steps can leave the benchmarks under a minute) still decides that issue.
FIRST_KEYS = frozenset({("knn", "eval60k", "bf16"), ("loss", "dml", "fp32")})

#: (op, shape, dtype) run right after the targets: the whole loss at 100k classes, the package's
#: headline use, which the first GPU run's budget never reached.
NEXT_KEYS = frozenset({("loss", "classes100k", "fp32")})


def order_key(case: Case) -> Tuple[bool, int]:
    """Run order, ``(heavy, tier)``: a GPU run's benchmarks may have two minutes, so the cases a
    target compares come first, case by case (not every provider and pass of a target's shape):

    0. the comparisons of :data:`FIRST_KEYS`' targets (Triton and the provider it is compared with);
    1. the internal switches still timed on those shapes (``TIMED_SWITCHES``: the kNN's
       selection by a threshold, Gluon forwards and plain epilogue at 60k: the designs that may
       reach its target);
    2. the other targets' comparisons;
    3. the training-step cases no target compares (the DAAL reference's step, ProxyAnchor's at
       11k classes): right after the targets' steps, within the training step's time slice
       (``bench/runner.py``, counted from its first case: later they would find it spent);
    4. :data:`NEXT_KEYS`;
    5. the other switches' comparisons;
    6. everything else;

    and last of all the heavy cases (an estimated peak over 32 GiB: the eager kNN of 60k x 60k,
    needed by no target). (Stable sorts keep the table order within a tier.)"""
    key = (case.op, case.shape, case.dtype)
    switch = (case.op, case.shape, case.dtype, case.pass_, case.provider) in SWITCH_CASES
    if case.target:
        tier = 0 if key in FIRST_KEYS else 2
    elif switch:
        tier = 1 if key in FIRST_KEYS else 5
    elif case.op == "train_step":
        tier = 3
    else:
        tier = 4 if key in NEXT_KEYS else 6
    return estimate_bytes(case) > HEAVY_BYTES, tier


# ----------------------------------------------------------------------------- FLOPs
def flops(op: str, dims: dict, pass_: str) -> Optional[float]:
    """Useful floating-point operations of one call (None where the pass has no GEMM worth
    counting; the training step's are not counted)."""
    if op == "train_step":
        return None
    if op == "pairwise":
        mnd = dims["M"] * dims["N"] * dims["D"]
        return {"fwd": 2.0, "bwd": 4.0, "fwdbwd": 6.0}[pass_] * mnd
    if op == "knn":
        mnd = dims["M"] * dims["N"] * dims["D"]
        return {"fwd": 2.0 * mnd, "bwd": None, "fwdbwd": 2.0 * mnd}[pass_]
    bcd = dims["B"] * dims["C"] * dims["D"]
    # the useful GEMMs of the line margin: x.p, x.u forward (4 BCD), the gradient GEMMs (8 BCD); a
    # backward's recomputation of the forward GEMMs is not counted (issue 12 counts 12 BCD; the
    # kernels do 16 BCD: bench/work_model.py)
    line = {"fwd": 4.0, "bwd": 8.0, "fwdbwd": 12.0}[pass_] * bcd
    if op == "line_margin":
        return line
    knn_part = 2.0 * dims["B"] * dims["B"] * dims["D"]  # the in-batch kNN of the loss
    return line + (knn_part if pass_ != "bwd" else 0.0)


def gemm_shape(op: str, dims: dict, max_out: int = 1 << 28) -> Tuple[int, int, int]:
    """The comparable GEMM (M, N, K) for the matmul baseline: the operator's own GEMM, with the
    rows cut so that the output stays under ``max_out`` elements (1 GB in float32; throughput
    saturates long before: 60k x 60k is measured as 4,473 x 60,000 x 512). K is D rounded up to
    a multiple of 16: at D = 129 rows of 258 bytes put cuBLAS off its aligned path, and the
    baseline is the rate a GEMM of that width reaches (its rate counts its own K)."""
    if op in ("pairwise", "knn"):
        m, n, k = dims["M"], dims["N"], dims["D"]
    else:
        m, n, k = dims["B"], dims["C"], dims["D"]
    k = -(-k // 16) * 16
    n = min(n, max_out)
    m = min(m, max(1, max_out // n))
    return m, n, k


# ----------------------------------------------------------------------------- memory estimates
def knn_chunk_rows(n_ref: int, elems: int = 1 << 28) -> int:
    """Rows per chunk of the chunked cdist+topk baseline: about 2^28 distances per chunk."""
    return max(1, elems // max(1, n_ref))


def _padded_rows_bytes(d: dict, prov: str, es: int) -> int:
    """The kNN's rows padded to 16 columns at an odd width (not with ``DAAL_ALIGN_D=off``:
    provider triton_unaligned)."""
    if d["D"] % 16 == 0 or prov == "triton_unaligned":
        return 0
    return (d["M"] + d["N"]) * -(-d["D"] // 16) * 16 * es


#: kernels/knn_threshold.py's lists: CAP (512) slots of 8 bytes per query row and 8 neighbours
#: (``list_cap``), in row chunks of at most LIST_BYTES (256 MiB) (this module is torch-free: the
#: values are repeated, and a test checks them against the kernel module's)
THRESHOLD_LIST_ROW_BYTES = 512 * 8
THRESHOLD_LIST_BYTES = 256 << 20


def _knn_bytes(d: dict, prov: str, es: int) -> int:
    mn = d["M"] * d["N"]
    if prov.startswith("triton"):  # the kernel under any switch setting: the k slots and the splits'
        lists = 0
        if prov in ("triton_threshold", "triton_threshold_half"):  # its lists (kernels/knn_threshold.py:
            # list_cap(k) slots of 8 bytes per row; on half the tiles every row's at once)
            lists = min(d["M"] * THRESHOLD_LIST_ROW_BYTES * -(-d["k"] // 8), THRESHOLD_LIST_BYTES)
        return 16 * d["M"] * d["k"] + (64 << 20) + lists + _padded_rows_bytes(d, prov, es)
    if prov == "chunked":
        rows = min(d["M"], knn_chunk_rows(d["N"]))
        return rows * d["N"] * (3 * es + 8) + (d["M"] + d["N"]) * d["D"] * 4
    # eager reference: float32 d, -2xy temporaries, bool mask, masked copy, stable sort
    # (values + int64 indices + its workspace): ~34 bytes per pair; compile keeps ~20.
    return (34 if prov == "eager" else 20) * mn


def _line_margin_bytes(d: dict, prov: str) -> int:
    if prov in ("triton", "triton_aten_glue", "triton_graphed", "triton_atomic_own", "triton_separate",
                "triton_xu_difference", "triton_copy_whole"):
        from work_model import extra_bytes  # the segment gradient, saved stats, the chunk buffers

        return extra_bytes(d["B"], d["C"], d["D"], "fp32", atomic=prov == "triton_atomic_own",
                           xu=prov != "triton_xu_difference",
                           copy="whole" if prov == "triton_copy_whole" else "chunks") + (64 << 20)
    if prov == "eager":
        return 80 * d["B"] * d["C"]  # ~15 float32 B x C temporaries kept for backward + an int64 one-hot
    return 24 * d["B"] * d["C"]


# Saved activations of one 224 x 224 image through VGG-19 (-BN) under bf16 autocast, forward +
# backward (conv inputs, ReLU/BN outputs, pooling indices; ~15 M activations, 2 bytes, 3 to 5 copies),
# rounded up; and the network's parameters with their gradients and AdamW state (~20 M x 18 bytes).
VGG_BYTES_PER_IMAGE = {"vgg19": 110e6, "vgg19_bn": 160e6}
VGG_STATE_BYTES = 400e6


def _train_step_bytes(d: dict, prov: str) -> int:
    width = d.get("width", 1.0)
    net = d["B"] * VGG_BYTES_PER_IMAGE[d["arch"]] * (d["H"] / 224) ** 2 * width + VGG_STATE_BYTES * width ** 2
    bc = d["B"] * d["C"]
    loss = {"triton": 16 * bc, "eager": 80 * bc + 40 * d["B"] ** 2, "proxyanchor": 40 * bc,
            "ce_floor": 12 * bc}[prov]
    return int(net + loss + 16 * d["C"] * d["D"])


def estimate_bytes(case: Case) -> int:
    """A rough upper estimate of the peak extra memory of a case (beyond its inputs), from the
    shape alone, to decide beforehand whether a provider can fit (not a measurement)."""
    d = case.dims
    es = 2 if case.dtype == "bf16" else 4
    prov, op = case.provider, case.op
    if op == "pairwise":
        mn = d["M"] * d["N"]
        per = {"triton": 8, "triton_unaligned": 8, "eager": 24, "compile": 12}[prov]
        # (its rows unpadded at an odd width: kernels/_common.py, ALIGN_DEFAULT)
        return per * mn + 4 * mn  # + the M x N upstream gradient of the bwd passes
    if op == "knn":
        return _knn_bytes(d, prov, es)
    if op == "train_step":
        return _train_step_bytes(d, prov)
    line = _line_margin_bytes(d, prov)
    if op == "line_margin":
        return line
    knn_part = 40 * d["B"] * d["B"] if not prov.startswith("triton") else 0
    return line + knn_part + 8 * d["C"] * d["D"] * es
