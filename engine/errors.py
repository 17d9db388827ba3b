"""Errors raised by the engine. One family, turned into HTTP or CLI errors only at the edge.

    EngineError
    ├── ModelFormatError      a checkpoint, GGUF file or config the engine cannot load
    ├── AdapterError          an adapter that is refused (format, shape, size, base mismatch)
    │   └── AdapterNotFound   no adapter of that name in the store
    ├── RequestError          a request the engine refuses (bad sampling params, too long, ...)
    ├── EngineConfigError     engine settings that cannot work (bad dtype, sizes < 1, ...)
    └── CapacityError         not enough KV blocks or adapter slots to ever admit the request
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFormatError(EngineError):
    """A model directory, checkpoint or GGUF file is malformed or of an unsupported architecture."""


class AdapterError(EngineError):
    """An adapter is refused before any of its weights touch the engine."""


class AdapterNotFound(AdapterError):
    """No adapter of that name is known."""


class RequestError(EngineError):
    """A request's parameters are invalid."""


class EngineConfigError(EngineError):
    """The engine's own configuration is invalid."""


class CapacityError(EngineError):
    """A request can never fit (longer than the KV cache, more adapters than slots)."""
