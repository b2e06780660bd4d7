"""The networks under the public name configs and every recorded run use as `_target_`
(`mnist_exp.models.ConvNet`); their code lives in `mnist_exp.training.models`."""

from mnist_exp.training.models import ConvNet, WideConvNet

__all__ = ["ConvNet", "WideConvNet"]
