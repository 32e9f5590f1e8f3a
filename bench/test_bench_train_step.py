"""Benchmarks of one training step (`daal_triton.train.model.EmbeddingNet`, VGG-19 / VGG-19-BN at
224 x 224, embedding 512, bf16 autocast, AdamW) with DAAL (Triton), DAAL (reference),
pytorch-metric-learning's ProxyAnchorLoss and a cross-entropy head (the floor).

Cases (shape x provider, pass ``step``) come from ``cases.cases_for("train_step", profile)`` through
``bench/conftest.py``; each records the step time, images per second, the peak memory and the
loss's share of the step (its forward + backward, CUDA events inside the step). Without CUDA:
smoke mode (a narrow VGG-19 on 32 x 32 images, float32, Triton's interpreter).
"""
OP = "train_step"


def test_bench_train_step(case, run_case):
    run_case(case)
