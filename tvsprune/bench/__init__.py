"""Runners, latency / memory / accuracy measurement and report rendering.

``tvsprune.bench`` is both this package and the Python API's bench function: once the
package is imported it shadows the package-level name, so the package itself is made
callable and forwards to :func:`tvsprune.api.bench`.
"""
import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import bench

        return bench(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
