"""The training side: abcd parametrizations (:mod:`~tplimits.training.parametrize`), their classification
(:mod:`~tplimits.training.classify`), how parameters start (:mod:`~tplimits.training.init`), finite-width
models under a parametrization (:mod:`~tplimits.training.model`, :mod:`~tplimits.training.optim`,
:mod:`~tplimits.training.instantiate`), coordinate checks (:mod:`~tplimits.training.coordcheck`), and
the :class:`~tplimits.training.loss.Loss` type."""
