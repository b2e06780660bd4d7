"""mnist-exp: a Hydra-configured, MLflow-tracked experiment framework around the seed's ConvNet.

From Python: `from mnist_exp.api import train, runs`. Bad input raises `mnist_exp.UserError`.
"""

from mnist_exp.errors import UserError

__all__ = ["UserError"]
