"""`python -m keras_meta`: see keras_meta/cli.py."""

from keras_meta.cli import entry_point

if __name__ == "__main__":
    entry_point()
