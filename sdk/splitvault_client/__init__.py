"""Python client for splitvault model servers (Open Inference Protocol v2 over REST).

with Client("https://models.example", api_key="...") as client:
    prediction = client.predict("resnet", images, top_k=5, chunk=True)
"""

from ._client import AsyncClient, Client
from ._embeddings import Embeddings
from ._exceptions import (
    BadRequest,
    Forbidden,
    ModelNotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    SplitVaultClientError,
    Timeout,
    TLSError,
    Unauthorized,
    Unavailable,
)
from ._protocol import __version__
from ._settings import InsecureTransportWarning
from ._signing import RequestSigner, create_signing_key
from ._types import ModelMetadata, Prediction, TensorSpec, Terms, TermsAcceptance

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Embeddings",
    "Forbidden",
    "InsecureTransportWarning",
    "ModelMetadata",
    "ModelNotFound",
    "Prediction",
    "ProtocolError",
    "RateLimited",
    "RequestSigner",
    "ServerError",
    "SplitVaultClientError",
    "TLSError",
    "TensorSpec",
    "Terms",
    "TermsAcceptance",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "__version__",
    "create_signing_key",
]
