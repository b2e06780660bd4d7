"""`python -m mnist_exp.rerun`: `mnist-rerun` by another name (see `mnist_exp.cli.rerun`)."""

from mnist_exp.cli.rerun import main

if __name__ == "__main__":
    main()
