"""frozenlm clients: `Client`, `AsyncClient` and the `frozenlm` CLI. Never imports torch."""

from clients.client import (
                            AsyncClient,
                            Client,
                            Conflict,
                            DocumentsJob,
                            FrozenLMError,
                            InferResult,
                            InvalidRequest,
                            NotFound,
                            Output,
                            Overloaded,
                            TaskInfo,
                            Unauthorized,
                            Uploaded,
)

__all__ = ["AsyncClient", "Client", "Conflict", "DocumentsJob", "FrozenLMError", "InferResult", "InvalidRequest", "NotFound",
           "Output", "Overloaded", "TaskInfo", "Unauthorized", "Uploaded"]
