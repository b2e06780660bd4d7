"""The networks under the public name configs and every recorded run use as `_target_`
(`mnist_exp.models.ConvNet`); their code lives in `mnist_exp.training.networks`."""

from mnist_exp.training.networks import ConvNet, WideConvNet

__all__ = ["ConvNet", "WideConvNet"]
