"""`python -m mnist_exp.train`: `mnist-train` by another name (see `mnist_exp.cli.train`)."""

from mnist_exp.cli.train import main

if __name__ == "__main__":
    main()
