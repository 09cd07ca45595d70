"""Deprecated name of `jobs.tune` (one name per stage); removed in the next release.

    python -m jobs.tune_cvae ...   still runs `python -m jobs.tune ...`, with a deprecation line.
"""

import sys

from jobs import tune as _stage

if __name__ == "__main__":
    print("jobs.tune_cvae is deprecated and will be removed: use python -m jobs.tune", file=sys.stderr)
    sys.exit(_stage.main())
sys.modules[__name__] = _stage  # `import jobs.tune_cvae` gives the stage module itself
