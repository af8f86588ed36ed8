"""mlsd-ray: an end-to-end machine-learning system on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlsd-ray")
except PackageNotFoundError:  # running from a checkout that is not pip-installed (GPU hosts)
    __version__ = "0.1.0"

__all__ = ["__version__"]
