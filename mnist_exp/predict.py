"""`python -m mnist_exp.predict`: `mnist-predict` by another name (see `mnist_exp.cli.predict`)."""

from mnist_exp.cli.predict import main

if __name__ == "__main__":
    main()
