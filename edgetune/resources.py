"""Where the project's data folders (``targets/``, ``calibration/``) are at run time.

In a source checkout (editable install, PYTHONPATH) they sit next to the ``edgetune``
package. A regular (non-editable) ``pip install .`` cannot put folders outside the package
into site-packages, so ``pyproject.toml`` ships them as wheel data files under
``<prefix>/share/edgetune/<name>/``; this module finds them through the installed
distribution's file list (correct for venvs, ``--user`` and ``--prefix`` installs alike).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """The folder ``name`` of this project: the checkout's, else the installed copy.

    Returns the checkout path when neither exists, so error messages name a real location.
    """
    source = SOURCE_ROOT / name
    # a checkout has pyproject.toml next to the package; in site-packages a folder of that
    # name would belong to some other distribution
    if source.is_dir() and (SOURCE_ROOT / "pyproject.toml").is_file():
        return source
    try:
        from importlib import metadata

        dist = metadata.distribution("edgetune")
        for f in dist.files or ():
            parts = f.parts
            if len(parts) >= 4 and parts[-4:-1] == ("share", "edgetune", name):
                return Path(dist.locate_file(f)).resolve().parent
    except Exception:  # not installed as a distribution (plain PYTHONPATH): fall through
        pass
    installed = Path(sysconfig.get_path("data")) / "share" / "edgetune" / name
    return installed if installed.is_dir() else source
