"""Deprecated name of `jobs.zoo` (one name per stage); removed in the next release.

    python -m jobs.train_loras ...   still runs `python -m jobs.zoo ...`, with a deprecation line.
"""

import sys

from jobs import zoo as _stage

if __name__ == "__main__":
    print("jobs.train_loras is deprecated and will be removed: use python -m jobs.zoo", file=sys.stderr)
    sys.exit(_stage.main())
sys.modules[__name__] = _stage  # `import jobs.train_loras` gives the stage module itself
