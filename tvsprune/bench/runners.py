"""Moved to :mod:`tvsprune.backends` (one module per backend); kept so old imports work."""
from ..backends import (BACKENDS, Backend, Runner, backend_availability, backend_kind, cuda_event_timed,  # noqa: F401
                        make_runner, register)
