//! Encoding and decoding of frames. Decoding never panics and never allocates: every
//! malformed input maps to one `DecodeError` variant.

use super::{Op, Status, FRAME_LEN_MAX, HEADER_LEN, KEY_LEN_MAX, MAGIC, REPLY_BIT, VALUE_LEN_MAX, VERSION};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic 0x{found:04x} (expected 0x{MAGIC:04x}): not a dds peer")]
    BadMagic { found: u16 },
    #[error("unsupported protocol version {found} (this build speaks {VERSION})")]
    BadVersion { found: u8 },
    #[error("unknown op 0x{found:02x}")]
    UnknownOp { found: u8 },
    #[error("unknown status {found}")]
    UnknownStatus { found: u8 },
    #[error("status {found} set on a request")]
    StatusOnRequest { found: u8 },
    #[error("reserved flags 0x{found:02x} set")]
    ReservedFlags { found: u8 },
    #[error("key of {len} bytes exceeds the limit of {KEY_LEN_MAX}")]
    KeyTooLong { len: usize },
    #[error("value of {len} bytes exceeds the limit of {VALUE_LEN_MAX}")]
    ValueTooLong { len: usize },
    #[error("{op} {what} carries a key ({len} bytes) it must not have")]
    UnexpectedKey { op: &'static str, what: &'static str, len: usize },
    #[error("{op} request carries a value ({len} bytes) it must not have")]
    UnexpectedValue { op: &'static str, len: usize },
    #[error("frame of {len} bytes where the header says {expected}")]
    LengthMismatch { len: usize, expected: usize },
}

/// Whether a frame is a request or a reply, with the fields that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request(Op),
    Reply(Op, Status),
}

impl Kind {
    pub fn op(self) -> Op {
        match self {
            Kind::Request(op) | Kind::Reply(op, _) => op,
        }
    }
}

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub request_id: u64,
    pub epoch: u64,
    pub key_len: usize,
    pub value_len: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.key_len + self.value_len
    }

    /// Parses and validates the first `HEADER_LEN` bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, DecodeError> {
        let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
        let magic = u16::from_le_bytes([h[0], h[1]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        if h[2] != VERSION {
            return Err(DecodeError::BadVersion { found: h[2] });
        }
        let op_byte = h[3];
        let op = Op::from_u8(op_byte & !REPLY_BIT).ok_or(DecodeError::UnknownOp { found: op_byte })?;
        let is_reply = op_byte & REPLY_BIT != 0;
        let kind = if is_reply {
            Kind::Reply(op, Status::from_u8(h[4]).ok_or(DecodeError::UnknownStatus { found: h[4] })?)
        } else {
            if h[4] != 0 {
                return Err(DecodeError::StatusOnRequest { found: h[4] });
            }
            Kind::Request(op)
        };
        if h[5] != 0 {
            return Err(DecodeError::ReservedFlags { found: h[5] });
        }
        let key_len = u16::from_le_bytes([h[6], h[7]]) as usize;
        let request_id = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let epoch = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        let value_len = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes")) as usize;
        if key_len > KEY_LEN_MAX {
            return Err(DecodeError::KeyTooLong { len: key_len });
        }
        if value_len > VALUE_LEN_MAX {
            return Err(DecodeError::ValueTooLong { len: value_len });
        }
        match kind {
            Kind::Request(op) => {
                if !op.request_has_key() && key_len != 0 {
                    return Err(DecodeError::UnexpectedKey { op: op.name(), what: "request", len: key_len });
                }
                if !op.request_has_value() && value_len != 0 {
                    return Err(DecodeError::UnexpectedValue { op: op.name(), len: value_len });
                }
            }
            Kind::Reply(op, _) => {
                if key_len != 0 {
                    return Err(DecodeError::UnexpectedKey { op: op.name(), what: "reply", len: key_len });
                }
            }
        }
        let header = Header { kind, request_id, epoch, key_len, value_len };
        debug_assert!(header.frame_len() <= FRAME_LEN_MAX);
        Ok(Some(header))
    }
}

/// A whole frame, borrowing its key and value from the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub request_id: u64,
    pub epoch: u64,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// Length of the frame that starts `buf`: `Ok(None)` until a whole header is there.
/// This is what a stream transport needs to cut frames out of a byte stream.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    Ok(Header::parse(buf)?.map(|h| h.frame_len()))
}

/// Decodes the frame at the start of `buf`. `Ok(None)` means more bytes are needed;
/// on success also returns how many bytes the frame took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    let Some(h) = Header::parse(buf)? else { return Ok(None) };
    let len = h.frame_len();
    let Some(body) = buf.get(HEADER_LEN..len) else { return Ok(None) };
    let (key, value) = body.split_at(h.key_len);
    Ok(Some((Frame { kind: h.kind, request_id: h.request_id, epoch: h.epoch, key, value }, len)))
}

/// Decodes a buffer that must hold exactly one frame (a transport already cut it out).
pub fn decode_exact(buf: &[u8]) -> Result<Frame<'_>, DecodeError> {
    match decode(buf)? {
        Some((frame, len)) if len == buf.len() => Ok(frame),
        Some((_, len)) => Err(DecodeError::LengthMismatch { len: buf.len(), expected: len }),
        None => Err(DecodeError::LengthMismatch {
            len: buf.len(),
            expected: frame_len(buf)?.unwrap_or(HEADER_LEN),
        }),
    }
}

/// Appends one frame to `out`. The caller has checked key and value against the
/// limits (the client returns a typed error first); exceeding them here is a bug.
pub fn encode(out: &mut Vec<u8>, frame: &Frame<'_>) {
    assert!(frame.key.len() <= KEY_LEN_MAX, "key of {} bytes passed the client's check", frame.key.len());
    assert!(frame.value.len() <= VALUE_LEN_MAX, "value of {} bytes passed the client's check", frame.value.len());
    let (op_byte, status) = match frame.kind {
        Kind::Request(op) => (op as u8, 0),
        Kind::Reply(op, status) => (op as u8 | REPLY_BIT, status as u8),
    };
    out.reserve(HEADER_LEN + frame.key.len() + frame.value.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(op_byte);
    out.push(status);
    out.push(0);
    out.extend_from_slice(&(frame.key.len() as u16).to_le_bytes());
    out.extend_from_slice(&frame.request_id.to_le_bytes());
    out.extend_from_slice(&frame.epoch.to_le_bytes());
    out.extend_from_slice(&(frame.value.len() as u32).to_le_bytes());
    out.extend_from_slice(frame.key);
    out.extend_from_slice(frame.value);
}
