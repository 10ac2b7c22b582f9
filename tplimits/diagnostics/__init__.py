"""Which regime a model trains in: its linearization, kernel drift, weak correlations, spectral norms
of the weight changes and feature movement, measured at growing widths (:mod:`.diagnose`)."""
