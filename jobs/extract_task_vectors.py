"""Deprecated name of `jobs.task_vectors` (one name per stage); removed in the next release.

    python -m jobs.extract_task_vectors ...   still runs `python -m jobs.task_vectors ...`, with a deprecation line.
"""

import sys

from jobs import task_vectors as _stage

if __name__ == "__main__":
    print("jobs.extract_task_vectors is deprecated and will be removed: use python -m jobs.task_vectors", file=sys.stderr)
    sys.exit(_stage.main())
sys.modules[__name__] = _stage  # `import jobs.extract_task_vectors` gives the stage module itself
