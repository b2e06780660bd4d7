"""mnist-exp: Hydra-configured MNIST experiments tracked in MLflow."""
