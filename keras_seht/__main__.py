"""``python -m keras_seht``: the ``keras-seht`` command.

See `keras_seht.console`.
"""

import sys

from keras_seht.console import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m keras_seht"))
