"""The MXNet side of the ``gluon`` peer format: the model zoo's own parameter names.

Gluon names parameters by block counters (``densenet0_stage1_conv3_weight``), so only the model
zoo itself can say what a network's names are; ``common.weights.peers`` pairs them with the canonical
ones. The neutral core reaches this through the registry (``MXNetAdapter.gluon_zoo_names``).
"""

from __future__ import annotations

from common.errors import WeightFileError
from densenet_mxnet._compat import mxnet as mx

__all__ = ["ZOO_DENSENETS", "zoo_param_names"]

# The DenseNets mxnet.gluon.model_zoo.vision has (MXNet 1.9.1, its last release).
ZOO_DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")


def zoo_param_names(name: str, num_classes: int) -> list[str]:
    """``collect_params()`` keys, in forward order, of the model zoo's network ``name``."""
    try:
        net = mx.gluon.model_zoo.vision.get_model(name, classes=num_classes)
    except ValueError:  # the zoo's own message lists every model it has, DenseNet or not
        raise WeightFileError(
            f"the Gluon model zoo has no {name} network; its DenseNets are {', '.join(ZOO_DENSENETS)}"
        ) from None
    return list(net.collect_params())
