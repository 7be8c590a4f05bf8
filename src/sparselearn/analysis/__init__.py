"""Analysis: the papers' instruments on any model or finished run (no training here).

* :mod:`~sparselearn.analysis.stats`: mean, standard error, Student's t intervals, Wilcoxon and
  Kruskal-Wallis (scipy).
* :mod:`~sparselearn.analysis.flops`: dense, sparse and empty-channel FLOPs, the speedups of Sparse
  Momentum Section 5.1 and the sparsifier's measured overhead.
* :mod:`~sparselearn.analysis.topology`: pruned/regrown weights, turnover, redistribution shares,
  ever-active weights per topology update.
* :mod:`~sparselearn.analysis.specialization`: class specialization of channels (App. B.1).
* :mod:`~sparselearn.analysis.fgsm`: robustness to FGSM examples (Starfire Sec. 3.2).
* :mod:`~sparselearn.analysis.runs`, :mod:`~sparselearn.analysis.plots`,
  :mod:`~sparselearn.analysis.report`: run folders, the figures (matplotlib) and the HTML report.
"""
