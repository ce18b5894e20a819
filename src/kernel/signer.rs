//! HMAC-SHA256 signing and constant-time verification of Jupyter messages.
//!
//! The MAC covers the header, parent_header, metadata and content frames, in that order. The key
//! is the ASCII bytes of the connection file's `key` (not hex-decoded); an empty key disables
//! signing, as in jupyter_client.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::connection::ConnectionInfo;

type HmacSha256 = Hmac<Sha256>;

/// The only signature scheme Jupyter kernels use in practice (and the only one we speak).
pub const SIGNATURE_SCHEME: &str = "hmac-sha256";

/// Length in bytes of an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;

/// Why a signer could not be built from a connection's key and scheme.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The connection file asks for a scheme other than `hmac-sha256`.
    #[error("unsupported signature scheme {0:?} (only {SIGNATURE_SCHEME} is supported)")]
    UnsupportedScheme(String),
    /// The MAC rejected the key (cannot happen for HMAC, kept so nothing is unwrapped).
    #[error("invalid HMAC key: {0}")]
    InvalidKey(String),
}

/// Why a signature did not verify. Kept apart from other codec errors so the cause is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature frame is not 64 hexadecimal characters.
    #[error("signature frame is not a hex HMAC-SHA256 tag")]
    Malformed,
    /// The signature does not match the message.
    #[error("signature does not match the message")]
    Mismatch,
}

/// Signs and verifies Jupyter messages with one connection's key.
///
/// Exists so that the keyed MAC is built once per connection and cloned per message: the key
/// schedule is not redone on every one of a flood of iopub messages.
#[derive(Clone)]
pub struct Signer {
    /// The keyed MAC, or `None` when the key is empty (signing disabled).
    mac: Option<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("enabled", &self.mac.is_some())
            .finish()
    }
}

impl Signer {
    /// A signer keyed with `key`'s bytes; an empty key disables signing and verification.
    pub fn new(key: &[u8]) -> Result<Self, SignerError> {
        if key.is_empty() {
            return Ok(Self { mac: None });
        }
        let mac = <HmacSha256 as Mac>::new_from_slice(key)
            .map_err(|e| SignerError::InvalidKey(e.to_string()))?;
        Ok(Self { mac: Some(mac) })
    }

    /// The signer for a connection file: its `key` as ASCII bytes, and its scheme checked.
    pub fn from_connection(info: &ConnectionInfo) -> Result<Self, SignerError> {
        if !info.key.is_empty() && info.signature_scheme != SIGNATURE_SCHEME {
            return Err(SignerError::UnsupportedScheme(
                info.signature_scheme.clone(),
            ));
        }
        Self::new(info.key.as_bytes())
    }

    /// Whether messages are signed at all (the key is not empty).
    pub fn is_enabled(&self) -> bool {
        self.mac.is_some()
    }

    /// The lowercase hex signature of the four signed frames; empty when signing is disabled.
    pub fn sign(&self, parts: [&[u8]; 4]) -> String {
        match self.keyed(parts) {
            Some(mac) => hex::encode(mac.finalize().into_bytes()),
            None => String::new(),
        }
    }

    /// Checks `signature` (the hex signature frame) against the four signed frames in constant
    /// time. Always succeeds when signing is disabled.
    pub fn verify(&self, parts: [&[u8]; 4], signature: &[u8]) -> Result<(), VerifyError> {
        let Some(mac) = self.keyed(parts) else {
            return Ok(());
        };
        let mut tag = [0u8; TAG_LEN];
        hex::decode_to_slice(signature, &mut tag).map_err(|_| VerifyError::Malformed)?;
        mac.verify_slice(&tag).map_err(|_| VerifyError::Mismatch)
    }

    /// A clone of the keyed MAC fed with the four frames, or `None` when unsigned.
    fn keyed(&self, parts: [&[u8]; 4]) -> Option<HmacSha256> {
        let mut mac = self.mac.clone()?;
        for part in parts {
            mac.update(part);
        }
        Some(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef-kernelbox-key";
    const HEADER: &[u8] = br#"{"msg_id":"m1","session":"s1","username":"u","date":"2024-01-01T00:00:00.000000Z","msg_type":"execute_request","version":"5.3"}"#;
    const CONTENT: &[u8] = br#"{"code":"1+1"}"#;
    /// Computed once with Python:
    /// `hmac.new(KEY, digestmod=hashlib.sha256)` updated with HEADER, `{}`, `{}`, CONTENT.
    const PYTHON_SIGNATURE: &str =
        "570d3149934771604f7954b65ac35b12ad9e20ef7906d4e262182d2cdf557777";

    fn parts() -> [&'static [u8]; 4] {
        [HEADER, b"{}", b"{}", CONTENT]
    }

    #[test]
    fn signature_matches_python_hmac() {
        let signer = Signer::new(KEY).unwrap();
        assert_eq!(signer.sign(parts()), PYTHON_SIGNATURE);
        signer.verify(parts(), PYTHON_SIGNATURE.as_bytes()).unwrap();
    }

    #[test]
    fn uppercase_hex_still_verifies() {
        let signer = Signer::new(KEY).unwrap();
        let upper = PYTHON_SIGNATURE.to_uppercase();
        signer.verify(parts(), upper.as_bytes()).unwrap();
    }

    #[test]
    fn tampered_content_is_rejected() {
        let signer = Signer::new(KEY).unwrap();
        let sig = signer.sign(parts());
        let tampered = [HEADER, b"{}", b"{}", br#"{"code":"1+2"}"#.as_slice()];
        assert_eq!(
            signer.verify(tampered, sig.as_bytes()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn other_key_is_rejected() {
        let sig = Signer::new(b"other").unwrap().sign(parts());
        let signer = Signer::new(KEY).unwrap();
        assert_eq!(
            signer.verify(parts(), sig.as_bytes()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn malformed_signatures_are_rejected() {
        let signer = Signer::new(KEY).unwrap();
        for bad in [
            &b""[..],
            b"zz",
            &PYTHON_SIGNATURE.as_bytes()[..62],
            b"not hex at all",
        ] {
            assert_eq!(signer.verify(parts(), bad), Err(VerifyError::Malformed));
        }
    }

    #[test]
    fn empty_key_disables_signing() {
        let signer = Signer::new(b"").unwrap();
        assert!(!signer.is_enabled());
        assert_eq!(signer.sign(parts()), "");
        signer.verify(parts(), b"").unwrap();
        signer.verify(parts(), b"anything").unwrap();
    }

    #[test]
    fn connection_scheme_is_checked() {
        let mut info = ConnectionInfo::ipc(std::path::Path::new("/tmp/x"), "k".into());
        assert!(Signer::from_connection(&info).unwrap().is_enabled());
        info.signature_scheme = "hmac-md5".into();
        assert!(matches!(
            Signer::from_connection(&info),
            Err(SignerError::UnsupportedScheme(_))
        ));
    }
}
