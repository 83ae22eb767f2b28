//! The translog: a shard's append-only write-ahead log of operations not yet in a tantivy commit.
//!
//! Owns the file format and its recovery; it does not decide when to commit (the shard does).
//!
//! Format: a sequence of frames `[len: u32 LE][crc32(payload): u32 LE][payload]`, the payload a
//! JSON [`Op`]. Recovery reads frames until the first short or corrupt one (a torn tail from a
//! crash mid-append), truncates the file there and returns the good operations.
//!
//! **Invariant:** an operation acknowledged to a client is in the translog and fsynced (under
//! [`Durability::Request`]), or already in a tantivy commit. The shard truncates the translog
//! only after a commit whose payload records the highest sequence number it contains, so replay
//! after a crash between the two skips what the commit already holds.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest frame accepted on replay; a length above it is a torn or corrupt frame.
const MAX_FRAME: usize = 512 * 1024 * 1024;
const HEADER: usize = 8;

/// When an append is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Before the request is acknowledged (ES's `index.translog.durability: request`).
    #[default]
    Request,
    /// Left to the OS (and to the next commit): faster, loses recent writes on power loss.
    Async,
}

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The shard-wide sequence number.
    pub seq_no: u64,
    /// The document's version after the operation.
    pub version: u64,
    /// The document id.
    pub id: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: OpKind,
}

/// An operation's effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// The document now has this `_source` (JSON text, exactly as stored).
    Index {
        /// The `_source` JSON text.
        source: String,
    },
    /// The document is gone.
    Delete,
}

/// Encodes one frame.
pub fn encode(op: &Op) -> Vec<u8> {
    let payload = serde_json::to_vec(op).unwrap_or_default();
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Decodes frames from the start of `bytes`; returns the operations and the length of the valid
/// prefix (everything after it is a torn or corrupt tail).
pub fn decode(bytes: &[u8]) -> (Vec<Op>, usize) {
    let mut ops = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(op) = serde_json::from_slice::<Op>(payload) else {
            break;
        };
        ops.push(op);
        at += HEADER + len;
    }
    (ops, at)
}

/// An open translog file.
#[derive(Debug)]
pub struct Translog {
    path: PathBuf,
    file: File,
    durability: Durability,
    len: u64,
}

impl Translog {
    /// Opens (or creates) the translog at `path`, drops any torn tail, and returns it with the
    /// operations it holds, in append order.
    pub fn open(path: &Path, durability: Durability) -> io::Result<(Self, Vec<Op>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (ops, valid) = decode(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - valid,
                "translog had a torn tail; truncated"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(valid as u64))?;
        Ok((
            Self {
                path: path.to_owned(),
                file,
                durability,
                len: valid as u64,
            },
            ops,
        ))
    }

    /// Appends `ops` in one write and, under [`Durability::Request`], fsyncs before returning.
    pub fn append(&mut self, ops: &[Op]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for op in ops {
            buf.extend_from_slice(&encode(op));
        }
        if let Err(e) = self.file.write_all(&buf) {
            // Leave no partial frame behind for the next append to follow.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        if self.durability == Durability::Request {
            self.file.sync_data()?;
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the log (after a commit that holds everything in it).
    pub fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(seq_no: u64) -> Op {
        Op {
            seq_no,
            version: 1,
            id: format!("d{seq_no}"),
            kind: if seq_no % 3 == 2 {
                OpKind::Delete
            } else {
                OpKind::Index {
                    source: format!("{{\"n\":{seq_no}}}"),
                }
            },
        }
    }

    #[test]
    fn frames_round_trip() {
        let ops: Vec<Op> = (0..10).map(op).collect();
        let bytes: Vec<u8> = ops.iter().flat_map(encode).collect();
        assert_eq!(decode(&bytes), (ops, bytes.len()));
    }

    #[test]
    fn every_torn_tail_keeps_the_whole_frames_before_it() {
        let ops: Vec<Op> = (0..4).map(op).collect();
        let frames: Vec<Vec<u8>> = ops.iter().map(encode).collect();
        let bytes: Vec<u8> = frames.concat();
        let mut boundaries = vec![0];
        for f in &frames {
            boundaries.push(boundaries.last().copied().unwrap_or(0) + f.len());
        }
        for cut in 0..bytes.len() {
            let (got, valid) = decode(&bytes[..cut]);
            let whole = boundaries.iter().filter(|&&b| b <= cut).count() - 1;
            assert_eq!(got, ops[..whole], "cut at {cut}");
            assert_eq!(valid, boundaries[whole]);
        }
    }

    #[test]
    fn a_corrupt_frame_ends_the_log() {
        let mut bytes: Vec<u8> = (0..3).map(op).flat_map(|o| encode(&o)).collect();
        let second = encode(&op(0)).len() + HEADER + 2;
        bytes[second] ^= 0xff;
        let (got, _) = decode(&bytes);
        assert_eq!(got, vec![op(0)]);
        // Garbage lengths are refused, not allocated.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).0, vec![]);
    }

    #[test]
    fn open_truncates_a_torn_tail_and_appends_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("translog");
        {
            let (mut log, ops) = Translog::open(&path, Durability::Request).expect("open");
            assert!(ops.is_empty());
            log.append(&[op(0), op(1)]).expect("append");
        }
        let mut f = OpenOptions::new().append(true).open(&path).expect("reopen");
        f.write_all(&encode(&op(2))[..5]).expect("torn write");
        drop(f);
        {
            let (mut log, ops) = Translog::open(&path, Durability::Request).expect("open");
            assert_eq!(ops, vec![op(0), op(1)]);
            log.append(&[op(3)]).expect("append");
        }
        let (mut log, ops) = Translog::open(&path, Durability::Request).expect("open");
        assert_eq!(ops, vec![op(0), op(1), op(3)]);
        log.truncate().expect("truncate");
        assert!(log.is_empty());
        let (_, ops) = Translog::open(&path, Durability::Request).expect("open");
        assert!(ops.is_empty());
    }
}
