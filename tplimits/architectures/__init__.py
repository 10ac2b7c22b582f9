"""Built-in architecture families, each a plugin module registered through the ``tplimits``
entry-point group (the same way a third-party plugin registers):

* ``mlp`` (:mod:`tplimits.architectures.mlp`): a fully connected network;
* ``resnet`` (:mod:`tplimits.architectures.resnet`): a CIFAR-style residual convolutional network;
* ``transformer`` (:mod:`tplimits.architectures.transformer`): a GPT-style pre-LayerNorm decoder;
* ``decorrelated-mlp`` (:mod:`tplimits.architectures.decorrelated`): an MLP whose hidden weights are
  preceded by learnable decorrelation matrices.

This package deliberately imports none of them; they are loaded by the plugin manager, and
``tpl.list_architectures()`` lists every registered family.
"""
