"""``mergekit-yaml`` with every tensor of the SafeMERGE method delayed, for tests that signal or
race a run in progress: ``python tests/slow_merge.py CONFIG OUT [mergekit-yaml options]``.

The delay (``SLOW_TENSOR_SECONDS``, default 0.2 s) is added by wrapping the method from outside;
the package itself is unchanged.
"""

from __future__ import annotations

import os
import time

from mergekit_safemerge.binding.method import SafeMergeMethod

_original = SafeMergeMethod.merge_group


def _slow_merge_group(self, group, /, **parameters):
    time.sleep(float(os.environ.get("SLOW_TENSOR_SECONDS", "0.2")))
    return _original(self, group, **parameters)


SafeMergeMethod.merge_group = _slow_merge_group

if __name__ == "__main__":
    from mergekit.scripts.run_yaml import main

    main()
