"""qai SDK: the auditor's light trust root. Imports no server code.

Public API::

    from sdk import Client, AsyncClient, instrument, run_manifest       # jobs and hooks
    from sdk import RunManifest, new_manifest, sign_manifest, verify_manifest
    from sdk import QaiError, VerificationError, canonical_json
    from sdk import SignatureBundle, SignaturePart, KeyDocument, verify_bundle, parse_suite
"""

from sdk.canonical import canonical_json
from sdk.client import AsyncClient, Client
from sdk.errors import QaiError, VerificationError
from sdk.hooks import instrument, run_manifest
from sdk.manifest import RunManifest, new_manifest, sign_manifest, verify_manifest
from sdk.signing import KeyDocument, SignatureBundle, SignaturePart, parse_suite, verify_bundle

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "KeyDocument",
    "QaiError",
    "RunManifest",
    "SignatureBundle",
    "SignaturePart",
    "VerificationError",
    "__version__",
    "canonical_json",
    "instrument",
    "new_manifest",
    "parse_suite",
    "run_manifest",
    "sign_manifest",
    "verify_bundle",
    "verify_manifest",
]
