"""The VGG-19 training program (``daal-train``, ``daal-eval``; docs/training.md).

``data/`` (data sets with the deep-metric-learning split, P x K sampler), ``model.py`` (VGG-19
trunk + pooling + linear head), ``config.py`` (the configuration and its checks), ``engine.py``
(loss, optimiser, schedule, the training step), ``run.py`` (a run: build, resume, fit, finish),
``checkpoint.py``, ``devices.py`` (device, AMP, backends, seeds), ``log.py`` (tagged log lines),
``evaluate.py`` (Recall@K, NMI, MAP@R, R-precision, sub-clusters, baselines), ``plots.py``
(t-SNE, training curves), ``cli.py``. Built on the public API of :mod:`daal_triton` only.
"""
