"""qai SDK: the auditor's light trust root. Imports no server code.

Public API::

    from sdk import QaiError, VerificationError, canonical_json
    from sdk import SignatureBundle, SignaturePart, KeyDocument, verify_bundle, parse_suite
"""

from sdk.canonical import canonical_json
from sdk.errors import QaiError, VerificationError
from sdk.signing import KeyDocument, SignatureBundle, SignaturePart, parse_suite, verify_bundle

__version__ = "0.1.0"

__all__ = [
    "KeyDocument",
    "QaiError",
    "SignatureBundle",
    "SignaturePart",
    "VerificationError",
    "__version__",
    "canonical_json",
    "parse_suite",
    "verify_bundle",
]
