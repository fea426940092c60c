"""KMS / HSM proxy: PQC + HSM-native classical keys over PKCS#11, signing, audit.

Public API::

    from kms import KMS, KmsConfig, Hsm, HsmConfig
"""

from kms.hsm import Hsm, HsmConfig
from kms.service import KMS, KmsConfig

__all__ = ["KMS", "Hsm", "HsmConfig", "KmsConfig"]
