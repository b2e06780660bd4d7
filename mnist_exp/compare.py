"""`python -m mnist_exp.compare`: `mnist-compare` by another name (see `mnist_exp.cli.compare`)."""

from mnist_exp.cli.compare import main

if __name__ == "__main__":
    main()
