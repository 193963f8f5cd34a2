"""Imported first by ``tokenprune``: its kernels are the top-level package ``kernels``, a name
another package can hold (:func:`require_own_kernels`)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["require_own_kernels"]

_OURS = ("MemberLists", "bipartite_dest", "merge_wavg", "attention")  # what tokenprune imports from it


def require_own_kernels() -> None:
    """Import tokenprune's ``kernels``, or say which package of that name was found instead.

    Hugging Face's ``kernels`` (``pip install kernels``; transformers loads hub kernels with it)
    is a top-level package of the same name: pip writes the second one installed over the
    first's files (uninstalling it then deletes ``kernels/__init__.py``), and on ``sys.path``
    either one hides the other, as does a ``kernels/`` folder of the user's own in the working
    directory. tokenprune would then stop deep inside with ``cannot import name 'MemberLists'
    from 'kernels'``, which names neither the cause nor the fix."""
    try:
        import kernels
    except ImportError as error:
        others = [d for d in importlib.metadata.packages_distributions().get("kernels", []) if d != "tokenprune"]
        if not others:
            raise  # ours, failing on its own: its error says why
        found, cause = f"the {others[0]!r} distribution's, which failed ({error})", error
    else:
        if all(hasattr(kernels, name) for name in _OURS):
            return
        file = getattr(kernels, "__file__", None)
        found = file or f"{', '.join(getattr(kernels, '__path__', []))} without its __init__.py"
        cause = None
    raise ImportError(
        f"tokenprune's kernels are the top-level package 'kernels', but 'import kernels' found {found}. "
        "Hugging Face's 'kernels' (pip install kernels) has the same name and cannot share an environment with "
        "tokenprune: pip uninstall kernels, then pip install --force-reinstall --no-deps tokenprune, or use "
        "separate environments. A folder of your own named 'kernels' in the working directory hides it too."
    ) from cause


require_own_kernels()
