//! Artifacts: files registered under a version, hashed and signed.
//!
//! Registering copies the file into the registry's artifact directory (so later pushes send
//! exactly the bytes that were hashed), computes its SHA-256 while copying, and signs the digest
//! with the fleet's Ed25519 key: `signature = Ed25519(key, sha256(file))`. A device holding the
//! public key checks both before installing (`X-Artifact-SHA256`, `X-Artifact-Signature`, hex).
//!
//! Keys are files of 64 hex digits: the 32-byte secret seed (`*.key`, mode 0600) and the
//! 32-byte public key (`*.pub`). [`generate_keys`] never overwrites.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// An artifact failure.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A key file is not a key.
    #[error("{0}")]
    BadKey(String),
    /// The artifact's bytes do not match what was registered, or the signature does not verify.
    #[error("{0}")]
    Mismatch(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// Writes a new key pair to `dir/<name>.key` (secret, 0600) and `dir/<name>.pub`; refuses to
/// overwrite either. Returns their paths.
pub fn generate_keys(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), ArtifactError> {
    let io = |e: std::io::Error, p: &Path| ArtifactError::Io(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(ArtifactError::Io(format!(
                "{} exists; not overwriting a key",
                p.display()
            )));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| ArtifactError::Io(format!("no randomness from the OS: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut secret = options
        .open(&secret_path)
        .map_err(|e| io(e, &secret_path))?;
    secret
        .write_all(format!("{}\n", hex(&seed)).as_bytes())
        .map_err(|e| io(e, &secret_path))?;
    std::fs::write(
        &public_path,
        format!("{}\n", hex(key.verifying_key().as_bytes())),
    )
    .map_err(|e| io(e, &public_path))?;
    Ok((secret_path, public_path))
}

/// Reads a secret key file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, ArtifactError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ArtifactError::Io(format!("{}: {e}", path.display())))?;
    let seed = unhex::<32>(&text).ok_or_else(|| {
        ArtifactError::BadKey(format!(
            "{}: not an Ed25519 secret key (64 hex digits)",
            path.display()
        ))
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key file.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, ArtifactError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ArtifactError::Io(format!("{}: {e}", path.display())))?;
    unhex::<32>(&text)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| {
            ArtifactError::BadKey(format!(
                "{}: not an Ed25519 public key (64 hex digits)",
                path.display()
            ))
        })
}

/// What registering a file produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Where the copy is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    /// Ed25519 signature of the digest, hex.
    pub signature: String,
    /// The public key that verifies it, hex.
    pub public_key: String,
}

/// Copies `source` to `dest` (which must not exist), hashing it on the way, and signs the
/// digest with `key`.
pub fn store(source: &Path, dest: &Path, key: &SigningKey) -> Result<Stored, ArtifactError> {
    let io = |e: std::io::Error, p: &Path| ArtifactError::Io(format!("{}: {e}", p.display()));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    }
    let mut input = BufReader::new(File::open(source).map_err(|e| io(e, source))?);
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| io(e, dest))?;
    let copied = (|| {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut size = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(|e| io(e, source))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            output.write_all(&buf[..n]).map_err(|e| io(e, dest))?;
            size += n as u64;
        }
        output.sync_all().map_err(|e| io(e, dest))?;
        Ok((size, hasher.finalize()))
    })();
    let (size, digest) = match copied {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(dest);
            return Err(e);
        }
    };
    let signature = key.sign(&digest);
    Ok(Stored {
        path: dest.to_owned(),
        size,
        sha256: hex(&digest),
        signature: hex(&signature.to_bytes()),
        public_key: hex(key.verifying_key().as_bytes()),
    })
}

/// SHA-256 of the file at `path`, hex.
pub fn sha256_file(path: &Path) -> Result<String, ArtifactError> {
    let mut input = BufReader::new(
        File::open(path).map_err(|e| ArtifactError::Io(format!("{}: {e}", path.display())))?,
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| ArtifactError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Checks that `signature` (hex) is `key`'s signature of the digest `sha256` (hex).
pub fn verify(sha256: &str, signature: &str, key: &VerifyingKey) -> Result<(), ArtifactError> {
    let digest = unhex::<32>(sha256)
        .ok_or_else(|| ArtifactError::Mismatch(format!("{sha256:?} is not a SHA-256 digest")))?;
    let signature = unhex::<64>(signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| ArtifactError::Mismatch("the signature is not 128 hex digits".into()))?;
    key.verify(&digest, &signature)
        .map_err(|_| ArtifactError::Mismatch("the signature does not verify with this key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(unhex::<2>(&hex(&[0xab, 0x01])), Some([0xab, 0x01]));
        assert_eq!(unhex::<2>("abc"), None);
        assert_eq!(unhex::<2>("zz01"), None);
        assert_eq!(unhex::<2>("é1"), None);
    }

    #[test]
    fn signatures_verify_only_for_their_digest_and_key() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let digest = [1u8; 32];
        let sig = hex(&key.sign(&digest).to_bytes());
        verify(&hex(&digest), &sig, &key.verifying_key()).unwrap_or_else(|e| panic!("{e}"));
        assert!(verify(&hex(&[2u8; 32]), &sig, &key.verifying_key()).is_err());
        assert!(verify(&hex(&digest), &sig, &other.verifying_key()).is_err());
        assert!(verify(&hex(&digest), "00", &key.verifying_key()).is_err());
    }
}
