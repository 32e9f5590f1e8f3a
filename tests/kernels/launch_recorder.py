"""Record the kernel launches the launchers make on an (emulated) H200, for the compile tests.

``launches()`` in each op module lists configurations by hand; what a launcher passes at run time
also depends on the call: KP from ``k``, flags (labels, self, a memory bank, casts, weights), and
Triton's own specialisation of every runtime argument (an int below 2^31 is ``i32``, an int equal
to 1 a constant, a size or pointer divisible by 16 marked so). This records them: every
``@triton.jit`` kernel of ``daal_triton.kernels`` is replaced by a recorder (nothing runs; integer
tensor arguments are zero-filled so the aten glue between launches indexes in range), and the
launchers are told they run on an sm_90 GPU with 132 SMs, on the shapes ``bench/gpu_check.sh``
times and the training loss uses; the scenarios named ``..., sm_75`` on a GPU without TF32 (a T4:
what a forced ``backend="triton"`` launches there, built for sm_75 and sm_70).
``python tests/kernels/launch_recorder.py OUT.json`` writes one
job per distinct launch (kernel, signature, constexprs, divisibility, options) with the scenarios
that launch it; tests/kernels/test_kernel_launched_builds.py compiles each for sm_90 and sm_80.

Run in a process of its own without ``TRITON_INTERPRET`` (the launchers then pick the GPU's
configurations and precision flags).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys

SM_COUNT = 132  # an H100 / H200
CAPABILITY = (9, 0)  # the scenarios' GPU; "capability" in a scenario's settings changes it

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/: daal_testing
from daal_testing import triton_specialisation  # noqa: E402


class _Recorder:
    def __init__(self, kernel, sink):
        self.fn = kernel
        self.name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        self.params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        self.sink = sink

    def __getitem__(self, grid):
        import torch

        def launch(*args, **kwargs):
            opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
            unknown = [k for k in kwargs if k not in self.params]
            if unknown:
                raise TypeError(f"{self.name}: launch keywords {unknown} are not parameters")
            signature, constexprs, divisible = {}, dict(kwargs), []
            for name, value in zip(self.params, args):
                kind, extra = triton_specialisation(value)  # Triton's own rule, as its launcher applies it
                if kind == "constexpr":
                    constexprs[name] = extra
                    continue
                signature[name] = kind
                if extra == "D":
                    divisible.append(name)
            for value in args:  # plausible outputs for the glue that reads them
                if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
                    value.data.zero_()  # .data: no version bump (saved for backward)
            self.sink(dict(kernel=self.name, signature=signature, constexprs=constexprs,
                           divisible=sorted(divisible), options=opts))
        return launch


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def record() -> list:
    """Every distinct launch of the scenarios, with the scenarios that make it."""
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] in ("", "0")
    import torch
    from daal_triton import core, functional
    from daal_triton.kernels import _common, combine, density, knn, knn_threshold, line_margin, normalize, pairwise

    jobs, scenario = {}, [""]

    def sink(job):
        key = json.dumps(job, sort_keys=True, default=str)
        jobs.setdefault(key, dict(job, scenarios=[]))
        if scenario[0] not in jobs[key]["scenarios"]:
            jobs[key]["scenarios"].append(scenario[0])

    modules = (_common, knn, knn_threshold, line_margin, pairwise, normalize, density, combine)
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "fn"):
                setattr(mod, name, _Recorder(obj, sink))
    capability = [CAPABILITY]
    for mod in modules:  # the launchers believe in an sm_90 GPU (or the scenario's)
        if hasattr(mod, "sm_count"):
            mod.sm_count = lambda device: SM_COUNT
        if hasattr(mod, "device_capability"):
            mod.device_capability = lambda device: capability[0]
    splits = knn._num_splits
    knn._num_splits = lambda M, N, bm, bn, device, *a, **kw: splits(M, N, bm, bn, torch.device("cuda"), *a, **kw)
    line_margin.mm_f32 = lambda a, b: torch.zeros(a.shape[0], b.shape[1])
    eligible = knn._tma_eligible  # descriptor loads: an sm_90 device has TMA

    def tma_eligible(*args):  # (an sm_80 scenario's device has none)
        saved, knn.interpreting = knn.interpreting, lambda: True  # the rule's last line, on a CPU tensor
        try:
            return eligible(*args) and knn.tma_device(torch.device("cuda"))
        finally:
            knn.interpreting = saved
    knn._tma_eligible = tma_eligible
    # the threshold filter's descriptor loads: an sm_90 device has TMA (its own alignment rule),
    # an sm_80 one (a scenario's "capability") none: the filter's pointer loads
    tma_ok = knn_threshold._tma_ok

    def threshold_tma_ok(q, r):
        saved, knn_threshold.interpreting = knn_threshold.interpreting, lambda: True
        try:
            return tma_ok(q, r) and knn.tma_device(torch.device("cuda"))
        finally:
            knn_threshold.interpreting = saved
    knn_threshold._tma_ok = threshold_tma_ok

    def _within(context, call):
        with context:
            call()

    g = torch.Generator().manual_seed(0)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def loss(dt, B, C, D, bank=False, weights=False, split=False, radius_grad=False, **hp):
        """The loss, forward and backward, as DAALLoss runs it (bench/cases.py "loss"); ``hp``:
        its hyperparameters (k, normalize, reduction, ...), ``weights`` a miner's per-sample
        weights, ``split`` the line/pull parts (``return_parts``), ``radius_grad`` a gradient
        through the radii as well."""
        emb = torch.randn(B, D, generator=g).to(dtypes[dt]).requires_grad_(True)
        seg = torch.randn(C, 2, D, generator=g).requires_grad_(True)
        labels = torch.randint(0, C, (B,), generator=g)
        kw = dict(ref_embeddings=torch.randn(4096, D, generator=g).to(dtypes[dt]),
                  ref_labels=torch.randint(0, C, (4096,), generator=g)) if bank else {}
        if bank == "with_batch":  # MemoryBank.with_batch's detached cat (the kNN's batch_rows backward)
            kw = dict(ref_embeddings=torch.cat([emb.detach(), kw["ref_embeddings"]]),
                      ref_labels=torch.cat([labels, kw["ref_labels"]]), ref_includes_batch=True)
        if weights:
            kw["sample_weights"] = torch.rand(B, generator=g)
        parts = core.compose(emb, labels, seg, core.Hyperparameters(**hp), functional._ops("triton"),
                             split_line_pull=split, **kw)
        total = parts.loss.sum()
        if radius_grad:
            total = total + parts.radius.nan_to_num(posinf=0.0).sum()
        total.backward()

    def knn_op(dt, M, N, D, k, labelled, own, grad=True):
        """The kNN on its own (bench/cases.py "knn"; the retrieval evaluation takes no gradient)."""
        q = torch.randn(M, D, generator=g).to(dtypes[dt])
        r = q if own else torch.randn(N, D, generator=g).to(dtypes[dt])
        ql = torch.randint(0, 100, (M,), generator=g) if labelled else None
        dist, index = knn._knn_forward(q, r, k, ql, ql if own else None, own, None)
        if grad:  # the op's body: its rows prepared as the forward's
            knn._knn_backward_op._init_fn(torch.ones(M, k), index, q, r, True, _common.align_rows("knn"))

    def line_margin_op(dt, B, C, D, atomic=False, seg_dt=None):
        """The line margin on its own, segments of the input dtype as the benchmarks build them
        (``seg_dt``: float32 ones, as DAALLoss and bench/tune_line_margin.py give)."""
        x = torch.randn(B, D, generator=g).to(dtypes[dt])
        seg = torch.randn(C, 2, D, generator=g).to(dtypes[seg_dt or dt])
        labels = torch.randint(0, C, (B,), generator=g)
        merged, xu = _common.merged_launches(), line_margin.xu_dot()
        out, lse, rs, st, sx = line_margin._line_margin2_op._init_fn(x, seg, labels, torch.rand(B), 16.0, 0.1,
                                                                     merged, xu)
        kept = line_margin._kept_copy(sx, x, C)  # as the autograd formula saves it
        line_margin._line_margin2_backward(torch.ones(B), x, seg, kept, st, labels, lse, rs, 16.0, 0.1, atomic,
                                           merged, xu)

    def pairwise_op(dt, M, N, D):
        x, y = torch.randn(M, D, generator=g).to(dtypes[dt]), torch.randn(N, D, generator=g).to(dtypes[dt])
        d = pairwise._pairwise_op._init_fn(x, y)
        pairwise._pairwise_backward_op._init_fn(torch.ones(M, N), d.abs() + 0.1, x, y, _common.align_rows("pairwise"))

    eval60k, bank = (60000, 60000, 512, 8, False, True, False), (1024, 65536, 512, 8, False, False)
    scenarios = [  # (name, call, environment): the defaults, then the switches gpu_check times
        ("loss fp32 dml", lambda: loss("fp32", 180, 100, 512), {}),
        ("loss bf16 dml", lambda: loss("bf16", 180, 100, 512), {}),
        ("loss fp32 dml bank", lambda: loss("fp32", 180, 100, 512, bank=True), {}),
        ("loss fp32 classes11k", lambda: loss("fp32", 1024, 11318, 512), {}),
        ("loss bf16 large", lambda: loss("bf16", 4096, 1000, 512), {}),
        ("knn bf16 eval60k", lambda: knn_op("bf16", *eval60k), {}),
        ("knn bf16 bank", lambda: knn_op("bf16", *bank), {}),
        ("knn fp32 bank", lambda: knn_op("fp32", *bank), {}),
        ("knn bf16 dml", lambda: knn_op("bf16", 180, 180, 512, 3, True, True), {}),
        # daal-train's retrieval evaluation (evaluate.neighbours): float32, k = the largest test
        # class + 1 (SOP ~13, CUB ~61, Cars ~100), above MAX_K for larger classes
        ("knn fp32 eval k=61", lambda: knn_op("fp32", 2048, 5924, 512, 61, False, False, False), {}),
        ("knn fp32 eval k=100", lambda: knn_op("fp32", 2048, 8041, 512, 100, False, False, False), {}),
        ("knn fp32 eval k=200", lambda: knn_op("fp32", 1024, 8041, 512, 200, False, False, False), {}),
        ("line_margin fp32 dml", lambda: line_margin_op("fp32", 180, 100, 512), {}),
        ("line_margin bf16 dml", lambda: line_margin_op("bf16", 180, 100, 512), {}),
        ("line_margin bf16 classes100k", lambda: line_margin_op("bf16", 1024, 100000, 512), {}),
        ("pairwise fp32 large", lambda: pairwise_op("fp32", 4096, 4096, 512), {}),
        ("pairwise bf16 large", lambda: pairwise_op("bf16", 4096, 4096, 512), {}),
        ("pairwise bf16 bank", lambda: pairwise_op("bf16", 1024, 65536, 512), {}),
        # float32 under torch.set_float32_matmul_precision("high"): single-pass TF32
        ("loss fp32 dml, tf32", lambda: loss("fp32", 180, 100, 512), {"precision": "high"}),
        ("knn fp32 bank, tf32", lambda: knn_op("fp32", *bank), {"precision": "high"}),
        ("pairwise fp32 large, tf32", lambda: pairwise_op("fp32", 4096, 4096, 512), {"precision": "high"}),
        # the internal switches' alternatives (bench/cases.py SWITCHES)
        # the table's tiles (DAAL_KNN_TILES=table: the default until 2026-12-04), with pointer loads
        # and through descriptors (DAAL_KNN_LOADS=tma: bench/tune_knn.py's candidates)
        ("knn bf16 eval60k, table tiles", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_TILES": "table"}),
        ("knn bf16 bank, table tiles", lambda: knn_op("bf16", *bank), {"DAAL_KNN_TILES": "table"}),
        ("knn bf16 dml, table tiles", lambda: knn_op("bf16", 180, 180, 512, 3, True, True),
         {"DAAL_KNN_TILES": "table"}),
        # the narrow tiles with labels (what a labelled search of > 16,768
        # rows launches; the loss batch's 180 rows take the table's tiles)
        ("knn bf16 labelled 20k", lambda: knn_op("bf16", 20000, 20000, 512, 3, True, True), {}),
        ("knn bf16 eval60k, table tiles, descriptor loads", lambda: knn_op("bf16", *eval60k),
         {"DAAL_KNN_TILES": "table", "DAAL_KNN_LOADS": "tma"}),
        ("knn bf16 bank, table tiles, descriptor loads", lambda: knn_op("bf16", *bank),
         {"DAAL_KNN_TILES": "table", "DAAL_KNN_LOADS": "tma"}),
        ("knn bf16 eval60k, checked merge", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_MERGE": "checked"}),
        ("knn bf16 bank, checked merge", lambda: knn_op("bf16", *bank), {"DAAL_KNN_MERGE": "checked"}),
        ("loss fp32 dml, checked merge", lambda: loss("fp32", 180, 100, 512), {"DAAL_KNN_MERGE": "checked"}),
        ("knn bf16 eval60k, wave splits", lambda: knn_op("bf16", *eval60k), {"split_policy": "waves"}),
        ("knn bf16 bank, wave splits", lambda: knn_op("bf16", *bank), {"split_policy": "waves"}),
        # the plain epilogue (DAAL_KNN_EPILOGUE=plain: the default until 2026-12-04's evening)
        ("knn bf16 eval60k, plain epilogue", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_EPILOGUE": "plain"}),
        ("knn bf16 bank, plain epilogue", lambda: knn_op("bf16", *bank), {"DAAL_KNN_EPILOGUE": "plain"}),
        ("knn bf16 dml, plain epilogue", lambda: knn_op("bf16", 180, 180, 512, 3, True, True),
         {"DAAL_KNN_EPILOGUE": "plain"}),
        ("knn bf16 eval60k, wide tiles", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_TILES": "wide"}),
        ("knn bf16 bank, wide tiles", lambda: knn_op("bf16", *bank), {"DAAL_KNN_TILES": "wide"}),
        ("line_margin bf16 classes100k, atomic own", lambda: line_margin_op("bf16", 1024, 100000, 512, atomic=True),
         {"DAAL_LM_OWN_SEG": "atomic"}),
        ("loss fp32 dml, atomic own", lambda: loss("fp32", 180, 100, 512), {"DAAL_LM_OWN_SEG": "atomic"}),
        # x.u as x.q - x.p (DAAL_LM_XU=difference: the default until 2026-12-06): the segments
        # themselves when they are contiguous in x's dtype (prep without CAST)
        ("line_margin bf16 classes100k, xu difference", lambda: line_margin_op("bf16", 1024, 100000, 512),
         {"DAAL_LM_XU": "difference"}),
        ("loss fp32 dml, xu difference", lambda: loss("fp32", 180, 100, 512), {"DAAL_LM_XU": "difference"}),
        # the forward's whole copy saved for the backward (DAAL_LM_COPY=whole: no copy per chunk)
        ("line_margin bf16 classes100k, whole copy", lambda: line_margin_op("bf16", 1024, 100000, 512),
         {"DAAL_LM_COPY": "whole"}),
        ("loss fp32 dml, aten glue", lambda: loss("fp32", 180, 100, 512), {"DAAL_GLUE": "aten"}),
        ("loss fp32 dml, separate", lambda: loss("fp32", 180, 100, 512), {"DAAL_LAUNCHES": "separate"}),
        # an embedding width that is no multiple of 16 (kernels/_common.py, ALIGN): the kNN's rows
        # padded by default, unaligned with DAAL_ALIGN_D=off (the benchmarks' *_d129 cases); the
        # pairwise distance's unaligned by default (decided by the H200 runs), padded with =pad
        ("loss fp32 dml D=129", lambda: loss("fp32", 180, 100, 129), {}),
        ("loss bf16 large D=129", lambda: loss("bf16", 4096, 1000, 129), {}),
        ("knn bf16 bank D=129", lambda: knn_op("bf16", 1024, 65536, 129, 8, False, False), {}),
        ("pairwise bf16 large D=129", lambda: pairwise_op("bf16", 4096, 4096, 129), {}),
        ("knn bf16 bank D=129, unaligned", lambda: knn_op("bf16", 1024, 65536, 129, 8, False, False),
         {"DAAL_ALIGN_D": "off"}),
        ("pairwise bf16 large D=129, padded", lambda: pairwise_op("bf16", 4096, 4096, 129),
         {"DAAL_ALIGN_D": "pad"}),
        ("knn bf16 dml, separate", lambda: knn_op("bf16", 180, 180, 512, 3, True, True), {"DAAL_LAUNCHES": "separate"}),
        # selection by a threshold (DAAL_KNN_SELECT=threshold: kernels/knn_threshold.py), bf16 and
        # fp16, with and without self pairs, k = 8 and 16, D = 512 and an odd width
        ("knn bf16 eval60k, threshold", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_SELECT": "threshold"}),
        ("knn bf16 bank, threshold", lambda: knn_op("bf16", *bank), {"DAAL_KNN_SELECT": "threshold"}),
        ("knn fp16 eval 20k k=16, threshold", lambda: knn_op("fp16", 20000, 20000, 512, 16, False, True, False),
         {"DAAL_KNN_SELECT": "threshold"}),
        ("knn fp16 bank D=129, threshold", lambda: knn_op("fp16", 1024, 65536, 129, 8, False, False),
         {"DAAL_KNN_SELECT": "threshold"}),
        # and a self-search's filter on half the tiles (DAAL_KNN_SELECT=half), k = 8 and 16
        ("knn bf16 eval60k, half", lambda: knn_op("bf16", *eval60k), {"DAAL_KNN_SELECT": "half"}),
        ("knn fp16 eval 20k k=16, half", lambda: knn_op("fp16", 20000, 20000, 512, 16, False, True, False),
         {"DAAL_KNN_SELECT": "half"}),
        # the probe's other sample strides (bench/probe_h200.py at 20k: kernels/knn_threshold.py,
        # PROBE_STRIDES; the lists scale with them)
        *[(f"knn bf16 probe 20k, threshold, a 1/{stride} sample",
           lambda stride=stride: _within(knn_threshold.sampled_every(stride),
                                         lambda: knn_op("bf16", 20000, 20000, 512, 8, False, True, False)),
           {"DAAL_KNN_SELECT": "threshold"}) for stride in knn_threshold.PROBE_STRIDES],
        # and its filter's other tiles at 60k (knn_threshold.FILTER_ALTERNATIVES)
        *[(f"knn bf16 probe 60k, threshold, filter tiles {blocks}",
           lambda blocks=blocks: _within(knn_threshold.filter_tiles(blocks), lambda: knn_op("bf16", *eval60k)),
           {"DAAL_KNN_SELECT": "threshold"}) for blocks in knn_threshold.FILTER_ALTERNATIVES],
        # and on an A100: no descriptor loads, so not the threshold path but the default's tiles
        ("knn bf16 eval 20k, threshold, sm_80", lambda: knn_op("bf16", 20000, 20000, 512, 8, False, True, False),
         {"DAAL_KNN_SELECT": "threshold", "capability": (8, 0)}),
        ("line_margin bf16 dml, separate", lambda: line_margin_op("bf16", 180, 100, 512), {"DAAL_LAUNCHES": "separate"}),
    ]
    # What a call can ask for beyond the benchmarks' shapes (a 2026-12-06 audit found 346 sm_90
    # launches built by no test): the loss's options (KP from k, no normalisation, per-sample
    # values, a miner's weights, the parts, a gradient through the radii, half precision) ...
    for name, options in (("k=1", dict(k=1)), ("k=2", dict(k=2)), ("k=8", dict(k=8)), ("k=16", dict(k=16)),
                          ("k=32", dict(k=32)), ("k=64", dict(k=64)), ("k=100", dict(k=100)),
                          ("no normalisation", dict(normalize=False)), ("per sample", dict(reduction="none")),
                          ("weights", dict(weights=True)), ("parts", dict(split=True)),
                          ("weights and parts", dict(weights=True, split=True)),
                          ("radius gradient", dict(radius_grad=True)), ("bank with the batch", dict(bank="with_batch"))):
        scenarios.append((f"call: loss fp32 dml, {name}", lambda options=options: loss("fp32", 180, 100, 512, **options), {}))
    for dt in ("bf16", "fp16"):
        for k in (1, 8, 16):
            scenarios.append((f"call: loss {dt} dml, k={k}", lambda dt=dt, k=k: loss(dt, 180, 100, 512, k=k), {}))
    scenarios.append(("loss fp16 large", lambda: loss("fp16", 4096, 1000, 512), {}))
    # ... the kNN at every KP (k = 1, 2, 5, 9, 17, 33, 65), each dtype, without labels or self
    # (a bank), with both (the loss batch's table tiles) and a self-search that fills the GPU
    # (the narrow tiles); float32 at "high" precision too ...
    for dt in ("fp32", "bf16", "fp16"):
        for k in (1, 2, 5, 9, 17, 33, 65):
            scenarios += [
                (f"call: knn {dt} bank 8k k={k}", lambda dt=dt, k=k: knn_op(dt, 1024, 8192, 512, k, False, False), {}),
                (f"call: knn {dt} dml k={k}", lambda dt=dt, k=k: knn_op(dt, 180, 180, 512, k, True, True), {}),
                (f"call: knn {dt} self 20k k={k}", lambda dt=dt, k=k: knn_op(dt, 20000, 20000, 512, k, False, True, False),
                 {}),
            ]
    for k in (1, 2, 9, 33, 65):
        scenarios.append((f"call: knn fp32 bank 8k k={k}, tf32", lambda k=k: knn_op("fp32", 1024, 8192, 512, k, False, False),
                          {"precision": "high"}))
    # ... narrow embeddings (one BLOCK_D of 16 or 32) ...
    for dt in ("fp32", "bf16", "fp16"):
        for d in (1, 16, 32):
            scenarios.append((f"call: knn {dt} bank 8k D={d}", lambda dt=dt, d=d: knn_op(dt, 1024, 8192, d, 8, False, False), {}))
        scenarios.append((f"call: loss {dt} dml D=32", lambda dt=dt: loss(dt, 180, 100, 32), {}))
    # ... the switches gpu_check times, crossed with the other dtypes, KPs and an A100 ...
    switches = (("plain epilogue", {"DAAL_KNN_EPILOGUE": "plain"}), ("wide tiles", {"DAAL_KNN_TILES": "wide"}),
                ("table tiles, descriptor loads", {"DAAL_KNN_TILES": "table", "DAAL_KNN_LOADS": "tma"}),
                ("checked merge", {"DAAL_KNN_MERGE": "checked"}), ("table tiles", {"DAAL_KNN_TILES": "table"}))
    for tag, env in switches:
        for dt, k in (("fp16", 16), ("fp32", 8), ("bf16", 1), ("bf16", 33)):
            scenarios += [
                (f"call: knn {dt} self 20k k={k}, {tag}", lambda dt=dt, k=k: knn_op(dt, 20000, 20000, 512, k, False, True, False),
                 env),
                (f"call: knn {dt} bank 8k k={k}, {tag}", lambda dt=dt, k=k: knn_op(dt, 1024, 8192, 512, k, False, False), env),
            ]
        scenarios.append((f"call: knn bf16 self 20k k=8, {tag}, sm_80",
                          lambda: knn_op("bf16", 20000, 20000, 512, 8, False, True, False), dict(env, capability=(8, 0))))
    for policy in ("threshold", "half"):
        scenarios += [
            (f"call: knn fp16 eval 20k D=129, {policy}", lambda: knn_op("fp16", 20000, 20000, 129, 8, False, True, False),
             {"DAAL_KNN_SELECT": policy}),
            (f"call: knn bf16 eval 20k k=1, {policy}", lambda: knn_op("bf16", 20000, 20000, 512, 1, False, True, False),
             {"DAAL_KNN_SELECT": policy}),
            (f"call: knn fp16 eval 20k k=2, {policy}", lambda: knn_op("fp16", 20000, 20000, 512, 2, False, True, False),
             {"DAAL_KNN_SELECT": policy}),
        ]
    # ... and the line margin with segments of each dtype beside x's (the benchmarks' direct calls;
    # DAALLoss hands it float32 segments), both x.u designs
    for dt, seg_dt in (("fp16", None), ("fp16", "bf16"), ("bf16", "fp16"), ("fp16", "fp32"), ("fp32", "bf16"),
                       ("fp32", "fp16")):
        for xu in ("dot", "difference"):
            scenarios.append((f"call: line_margin {dt} dml seg {seg_dt or dt}, xu {xu}",
                              lambda dt=dt, seg_dt=seg_dt: line_margin_op(dt, 180, 100, 512, seg_dt=seg_dt),
                              {"DAAL_LM_XU": xu}))
    # ... and sizes the JIT makes constants or marks divisible otherwise: one sample, one class
    # (docs/method.md's edge cases), one query row, odd row counts
    scenarios += [
        ("call: loss fp32 B=1", lambda: loss("fp32", 1, 100, 512), {}),
        ("call: loss fp32 C=1", lambda: loss("fp32", 180, 1, 512), {}),
        ("call: loss bf16 B=1 C=1", lambda: loss("bf16", 1, 1, 512), {}),
        ("call: knn bf16 one query", lambda: knn_op("bf16", 1, 8192, 512, 8, False, False), {}),
        ("call: knn fp32 odd rows", lambda: knn_op("fp32", 1001, 4099, 512, 8, False, False), {}),
        ("call: line_margin fp32 B=1 C=1", lambda: line_margin_op("fp32", 1, 1, 512), {}),
        ("call: pairwise fp32 one row", lambda: pairwise_op("fp32", 1, 4099, 512), {}),
    ]
    scenarios.append(("call: pairwise fp16 large", lambda: pairwise_op("fp16", 4096, 4096, 512), {}))
    # a GPU without TF32 (a T4; a V100 launches the same): float32 at both matmul precisions,
    # float16 (its mixed precision) and bfloat16; _capabilities in the build test adds sm_75, sm_70
    for dt in ("fp32", "fp16", "bf16"):
        for precision in (("highest", "high") if dt == "fp32" else ("highest",)):
            tag = f"{dt}{', tf32' if precision == 'high' else ''}, sm_75"
            t4 = {"precision": precision, "capability": (7, 5)}
            scenarios += [
                (f"loss {tag}", lambda dt=dt: loss(dt, 180, 100, 512), t4),
                (f"knn {tag}", lambda dt=dt: knn_op(dt, 1024, 4096, 512, 8, False, False), t4),
                (f"line_margin {tag}", lambda dt=dt: line_margin_op(dt, 180, 100, 512), t4),
                (f"pairwise {tag}", lambda dt=dt: pairwise_op(dt, 512, 512, 512), t4),
            ]
    # bench/tune_line_margin.py's candidates, as it launches them (its shape, float32 segments)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
    import tune_line_margin as tune

    def with_candidate(fam, kernel, blocks):
        def call():
            table = line_margin.CONFIGS[fam][kernel]
            bb, bc, w, s = blocks
            line_margin.CONFIGS[fam][kernel] = table.with_blocks(BLOCK_B=bb, BLOCK_C=bc, num_warps=w, num_stages=s)
            try:
                line_margin_op("fp32" if fam == "fp32" else "bf16", 1024, 100000, 512, seg_dt="fp32")
            finally:
                line_margin.CONFIGS[fam][kernel] = table
        return call

    for fam in ("half", "fp32"):
        for kernel in tune.KERNELS:
            previous = [tune.PREVIOUS[fam][kernel]] if kernel in tune.PREVIOUS.get(fam, {}) else []
            for blocks in previous + tune.CANDIDATES[kernel]:
                scenarios.append((f"tune_line_margin {fam} {kernel} {blocks}", with_candidate(fam, kernel, blocks), {}))
    for name, call, settings in scenarios:
        scenario[0] = name
        settings = dict(settings)
        precision = settings.pop("precision", "highest")
        policy = settings.pop("split_policy", knn.SPLIT_POLICY)
        capability[0] = settings.pop("capability", CAPABILITY)
        before_policy, before_precision = knn.SPLIT_POLICY, torch.get_float32_matmul_precision()
        knn.SPLIT_POLICY = policy
        torch.set_float32_matmul_precision(precision)
        try:
            with _env(**settings):
                call()
        finally:
            knn.SPLIT_POLICY = before_policy
            torch.set_float32_matmul_precision(before_precision)
            capability[0] = CAPABILITY
    return list(jobs.values())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/kernels/launch_recorder.py OUT.json")
    recorded = record()
    with open(sys.argv[1], "w") as f:
        json.dump(recorded, f, indent=1, default=str)
    print(f"{len(recorded)} distinct launches")
