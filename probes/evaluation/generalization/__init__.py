"""Leave-source-out generalisation: train on some groups of sources, test on a group never seen.

Every figure before this package came from a random split of the training sources, which says little about
traffic from elsewhere. Here each *group* of related sources (a harmful prompt set with its benign
look-alikes, the dialogue sets, the response sets, the tweets, ...) is held out in turn: the probe, the
expert, the DV head, the unsafe cut and the delegation thresholds are all fitted on the other groups and
applied unchanged to the held-out one.

Cost model: the records of every group are sampled once into a *pool*; features (every layer/pooling
variant in one forward pass) and the frozen expert's embeddings are cached per record by content hash
(``probes.activations.record_cache``), so each recipe/variant is only cheap head fits on cached vectors.

Modules, in the order a run goes: ``pool`` (source groups, the sampled pool, its cached features), ``folds``
(recipes, the run's configuration, one fold's rows and weights), ``scoring`` (a fold's probe, expert, cuts,
adaptation and cascade policies), ``loso`` (``run_loso``: every recipe on every group, the means, the feature
sweep) and ``report`` (report.md).
"""
