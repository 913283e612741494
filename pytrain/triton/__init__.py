"""pytrain's Triton kernels, whose sources are the repository's top-level kernels/ folder (the project's
declared layout); use them through pytrain.kernels. kernels/<op>_triton.py holds the Triton kernels of the
op whose public function, validation and dispatch are pytrain/kernels/<op>.py.

kernels/ has no __init__.py on purpose. With one, Python started from the repository root (its folder first
on sys.path, as under pytest) imports it as a top-level package named `kernels` and so hides Hugging Face's
`kernels` package, which transformers imports. A built wheel copies the folder's files here (setup.py's
package_dir); in a source checkout or an editable install this file points the package at the folder.
"""

from pathlib import Path

_SOURCES = Path(__file__).resolve().parent.parent.parent / "kernels"
if _SOURCES.is_dir():
    __path__.append(str(_SOURCES))
