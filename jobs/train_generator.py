"""Deprecated name of `jobs.generator` (one name per stage); removed in the next release.

    python -m jobs.train_generator ...   still runs `python -m jobs.generator ...`, with a deprecation line.
"""

import sys

from jobs import generator as _stage

if __name__ == "__main__":
    print("jobs.train_generator is deprecated and will be removed: use python -m jobs.generator", file=sys.stderr)
    sys.exit(_stage.main())
sys.modules[__name__] = _stage  # `import jobs.train_generator` gives the stage module itself
